"""Shared fixtures: a real moto S3 server on 127.0.0.1 and real FUSE mounts of it.

Every fixture that starts something stops it, even when the test fails: mounts are
unmounted with fusermount3 -u (then lazily), daemons are killed by PID.
"""

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from tieredfs.devserver import DevS3Server, wait_until
from tieredfs.stale import is_dead_mount

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
_bucket_ids = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def aws_env():
    old = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    os.environ.pop("AWS_PROFILE", None)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3server(aws_env):
    server = DevS3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(s3server):
    return boto3.client("s3", endpoint_url=s3server.url)


@pytest.fixture
def bucket(s3, request):
    """A fresh, empty bucket for this test."""
    name = f"t{next(_bucket_ids)}-{os.getpid()}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 12 MiB filesystem to fill up (tmpfs: we are root here, as for /dev/fuse)."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(path: Path, leave: int = 0) -> None:
    """Write zeros into path/filler until its filesystem is full, then free `leave` bytes."""
    with open(path / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
        f.truncate(max(0, f.tell() - leave))


def tieredfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tieredfs", *args]


class Mount:
    """One real tieredfs daemon in the foreground, serving `path`."""

    def __init__(self, url: str, path: Path, endpoint: str, cache_dir: Path, log: Path,
                 extra: list[str]):
        self.url, self.path, self.endpoint = url, path, endpoint
        self.cache_dir, self.log, self.extra = cache_dir, log, extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mount":
        cmd = tieredfs_cmd("mount", self.url, str(self.path), "--endpoint-url", self.endpoint,
                           "--cache-dir", str(self.cache_dir), "--foreground", *self.extra)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        # A dead mount left by kill() passes ismount() until the new daemon has replaced it.
        ok = wait_until(lambda: (os.path.ismount(self.path) and not is_dead_mount(self.path))
                        or self.proc.poll() is not None, 30)
        if not ok or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"mount failed:\n{self.log.read_text()}")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict:
        import json
        return json.loads(os.getxattr(self.path, "user.tieredfs.stats"))

    def settle(self, timeout: float = 30) -> None:
        """Wait until no prefetch is in flight and every fetched block is written to the cache
        (both happen behind the reader's back). Files a directory walk prefetched stay held
        for their open: not in flight."""

        def idle() -> bool:
            s = self.stats()
            in_flight = (s.get("readahead.budget_used_bytes", 0) - s.get("readahead.walk_held_bytes", 0)
                         - s.get("readahead.pack_held_bytes", 0))
            return in_flight == 0 and s.get("chain.fill_queue_bytes", 0) == 0

        assert wait_until(idle, timeout)

    def kill(self) -> None:
        """SIGKILL the daemon (a crash); the dead mount stays until stop()."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        unmount(self.path)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        unmount(self.path, lazy=True)

    def restart(self) -> "Mount":
        self.stop()
        return self.start()


def unmount(path: Path, lazy: bool = False) -> None:
    # Right after a mount, fusermount3 -u now and then finds it busy for a moment: retry briefly.
    for _ in range(10):
        if not (os.path.ismount(path) or _is_dead_mount(path)):
            return
        done = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), str(path)],
                              capture_output=True, timeout=30)
        if done.returncode == 0:
            return
        time.sleep(0.2)


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
        return False
    except OSError:
        return str(path) in Path("/proc/mounts").read_text()


@pytest.fixture
def mount_factory(s3server, tmp_path):
    """mount_factory(bucket, *extra_args, cache_dir=None, prefix='') -> a started Mount."""
    mounts: list[Mount] = []
    counter = itertools.count()

    def factory(bucket: str, *extra: str, cache_dir: Path | None = None, prefix: str = "",
                endpoint: str | None = None, start: bool = True) -> Mount:
        n = next(counter)
        path = tmp_path / f"mnt{n}"
        path.mkdir()
        m = Mount(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}", path,
                  endpoint or s3server.url, cache_dir or tmp_path / f"cache{n}",
                  tmp_path / f"daemon{n}.log", list(extra))
        mounts.append(m)
        return m.start() if start else m

    yield factory
    for m in mounts:
        m.stop()


@pytest.fixture
def put(s3, bucket):
    """put(key, data) uploads to this test's bucket and returns the data."""

    def _put(key: str, data: bytes) -> bytes:
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        return data

    return _put


def read_file(path, chunk: int = 1 << 20) -> bytes:
    with open(path, "rb") as f:
        out = bytearray()
        while piece := f.read(chunk):
            out += piece
        return bytes(out)


def read_uncached(path) -> bytes:
    """Read a file through the daemon: the kernel's page cache of it is dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def deadline_call(fn, seconds: float):
    """Run fn; fail the test if it takes longer than `seconds` (a hang detector, not a benchmark)."""
    start = time.monotonic()
    result = fn()
    assert time.monotonic() - start < seconds, f"took longer than {seconds}s"
    return result
