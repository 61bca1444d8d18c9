"""Mounts the bench starts: a tieredfs daemon in the foreground (so its PID is known for
VmHWM) and the no-op reference filesystem. Both are always unmounted and stopped.

"Cold" here means: a new daemon, an empty (or page-cache-dropped) cache dir, and the file's
pages dropped with posix_fadvise(DONTNEED) (only the files under test lose theirs, unlike
/proc/sys/vm/drop_caches). A new FUSE mount starts with no cached pages of its own.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tieredfs.devserver import wait_until

REPO = Path(__file__).resolve().parent.parent
STATS_XATTR = "user.tieredfs.stats"


class _Process:
    """A FUSE daemon in the foreground; stop() unmounts (-u, then -z) and reaps it."""

    def __init__(self, path: Path, log: Path, cwd: Path = REPO):
        self.path, self.log = path, log
        self.cwd = cwd  # `python -m tieredfs` runs the tree it starts in (bench/ab.py: another build's)
        self.proc: subprocess.Popen | None = None
        self.ready_seconds = 0.0
        self.stop_seconds = 0.0  # unmount until the daemon has exited

    def _spawn(self, cmd: list[str], ready) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd)
        ok = wait_until(lambda: self.proc.poll() is not None or ready(), 60, interval=0.002)
        self.ready_seconds = time.perf_counter() - start
        if not ok or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"mount at {self.path} failed, log {self.log}:\n"
                               f"{self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def peak_rss_bytes(self) -> int:
        """VmHWM: the daemon's peak resident set since it started."""
        return vm_hwm(self.pid)

    def stop(self) -> None:
        start = time.perf_counter()
        unmount(self.path)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        unmount(self.path, lazy=True)
        self.stop_seconds = time.perf_counter() - start

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class TieredMount(_Process):
    def __init__(self, url: str, path: Path, endpoint: str, cache_dir: Path, log: Path,
                 extra: list[str] = (), cwd: Path = REPO):
        super().__init__(path, log, cwd)
        self.cmd = [sys.executable, "-m", "tieredfs", "mount", url, str(path),
                    "--endpoint-url", endpoint, "--cache-dir", str(cache_dir), "--foreground",
                    *extra]
        self.cache_dir = cache_dir

    def start(self) -> "TieredMount":
        """Ready as `tieredfs mount` defines it: the mount answers (a stat of its root)."""
        self._spawn(self.cmd, lambda: _answers(self.path))
        return self

    def stats(self) -> dict[str, int]:
        return json.loads(os.getxattr(self.path, STATS_XATTR))

    def settle(self, timeout: float = 60) -> None:
        """Until the blocks queued for the cache are written."""
        wait_until(lambda: self.stats().get("chain.fill_queue_bytes", 0) == 0, timeout, interval=0.05)


class NullMount(_Process):
    def __init__(self, path: Path, files: dict[str, int], log: Path, keep_cache: bool = False):
        super().__init__(path, log)
        self.cmd = [sys.executable, "-m", "bench.nullfs", str(path),
                    *(["--keep-cache"] if keep_cache else []),
                    *[a for name, size in files.items() for a in ("--file", f"{name}={size}")]]

    def start(self) -> "NullMount":
        self._spawn(self.cmd, lambda: _answers(self.path))
        return self


def vm_hwm(pid: int) -> int:
    """A process's peak resident set in bytes (VmHWM); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) * 1024


def _answers(path: Path) -> bool:
    """The FUSE daemon (not the directory below it) answers a stat of the mount point."""
    try:
        return os.path.ismount(path) and os.stat(path) is not None
    except OSError:
        return False


def unmount(path: Path, lazy: bool = False, retry_for: float = 3.0) -> None:
    """fusermount3 -u, retried: right after a mount is ready it sometimes fails with EBUSY
    (about 1 in 50 here); without the retry the daemon keeps serving and stop() waits 20 s."""
    deadline = time.monotonic() + retry_for
    while _mounted(path):
        proc = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), str(path)],
                              capture_output=True, timeout=30)
        if proc.returncode == 0 or lazy or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _mounted(path: Path) -> bool:
    """In /proc/mounts, which also lists a dead mount (ENOTCONN) that ismount() cannot stat."""
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_tree_cache(root: Path) -> int:
    """Drop the cached pages of every file under root (written files are synced first)."""
    os.sync()
    n = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            drop_file_cache(Path(dirpath) / name)
            n += 1
    return n


def unwind_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, so they unwind through the callers' finally
    blocks: every mount is unmounted and every server stopped (SIGINT may arrive ignored when
    started in the background)."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    # Once: a second signal must not cut the clean-up short (a scratch dir half removed was
    # left behind when SIGTERM came twice); SIGKILL still stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt
