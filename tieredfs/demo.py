"""`tieredfs demo`: an embedded S3 server, a sample bucket, a real mount, reads through it.

The mount is a real `tieredfs mount --foreground` child, so the demo exercises exactly
what a user runs. Everything it starts is stopped in reverse order (unmount, then the
server), also on Ctrl-C, SIGTERM or a failed check.
"""

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .devserver import DevS3Server, wait_until
from .errors import DataMismatch, MountError
from .service import check_mountpoint

MiB = 1 << 20
BUCKET = "tieredfs-demo"
# moto reads the whole object for every ranged GET, so the large files stay modest.
LARGE_SIZES = (8 * MiB, 12 * MiB, 16 * MiB)
SMALL_FILES = 300
SMALL_MAX = 8192
# The demo's own S3 server accepts any key; real credentials must never be sent to it.
DEMO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tieredfs-demo", "AWS_SECRET_ACCESS_KEY": "tieredfs-demo"}


def sample_dataset(seed: int = 3) -> dict[str, bytes]:
    """A few large files and a few hundred small ones in nested directories."""
    rng = random.Random(seed)
    files = {f"large/part-{i}.bin": rng.randbytes(size) for i, size in enumerate(LARGE_SIZES)}
    for i in range(SMALL_FILES):
        key = f"small/shard-{i % 4}/group-{i // 4 % 5}/item-{i:04d}.dat"
        files[key] = rng.randbytes(rng.randint(1, SMALL_MAX))
    return files


@dataclass
class Pass:
    files: int
    nbytes: int
    seconds: float
    gets: int

    def line(self, name: str) -> str:
        rate = self.nbytes / MiB / max(self.seconds, 1e-9)
        return (f"  {name:<10} {self.files} files, {self.nbytes / MiB:.1f} MiB in {self.seconds:.2f} s"
                f" = {rate:.1f} MiB/s, {self.gets} S3 GETs, every byte verified")


def run_demo(mountpoint: Path | None, keep: bool) -> None:
    if mountpoint is not None:
        mountpoint = mountpoint.absolute()
        check_mountpoint(mountpoint)  # before anything is started or uploaded
    with contextlib.ExitStack() as stack:
        stack.callback(signal.signal, signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
        server = stack.enter_context(DevS3Server())
        print(f"  S3 server  moto on {server.url} (embedded, dummy credentials)")
        digests = _upload(server, sample_dataset())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tieredfs-demo-")))
        mnt = mountpoint or tmp / "mnt"
        mnt.mkdir(exist_ok=True)  # only the temp one: check_mountpoint found a given one
        started = time.monotonic()
        daemon = stack.enter_context(_DemoMount(server.url, mnt, tmp))
        # A second Ctrl-C must not cut the clean-up short.
        stack.callback(signal.signal, signal.SIGINT, signal.SIG_IGN)
        print(f"  mounted    s3://{BUCKET} on {mnt} in {time.monotonic() - started:.2f} s"
              f" (cache {daemon.cache_dir})")
        print(_read_all(mnt, digests, server, drop_page_cache=False).line("cold read"))
        print(_read_all(mnt, digests, server, drop_page_cache=True).line("warm read")
              + " (from the local cache)")
        if keep:
            _wait_for_interrupt(mnt, server)
    print("  cleaned up: unmounted, S3 server stopped")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _upload(server: DevS3Server, files: dict[str, bytes]) -> dict[str, str]:
    server.create_bucket(BUCKET)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: server.put(BUCKET, *kv), files.items()))
    large = [k for k in files if k.startswith("large/")]
    print(f"  dataset    {len(large)} large files ({sum(len(files[k]) for k in large) / MiB:.0f} MiB),"
          f" {len(files) - len(large)} small files in nested directories")
    return {key: xxhash.xxh3_128_hexdigest(data) for key, data in files.items()}


def _read_all(mnt: Path, digests: dict[str, str], server: DevS3Server, drop_page_cache: bool) -> Pass:
    """Walk the mount, read every file, compare with the source; GETs counted by the server."""
    server.reset_counts()
    started = time.monotonic()
    found = {str(Path(d, f).relative_to(mnt)) for d, _, names in os.walk(mnt) for f in names}
    if found != set(digests):
        missing, extra = sorted(set(digests) - found), sorted(found - set(digests))
        raise DataMismatch(f"listing differs from the bucket: missing {missing[:3]}, extra {extra[:3]}")
    nbytes = 0
    for key, digest in digests.items():
        data = _read(mnt / key, drop_page_cache)
        if xxhash.xxh3_128_hexdigest(data) != digest:
            raise DataMismatch(f"{key}: bytes read through the mount differ from the source")
        nbytes += len(data)
    seconds = time.monotonic() - started
    return Pass(len(digests), nbytes, seconds, server.counts().get("GET", 0))


def _read(path: Path, drop_page_cache: bool) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop_page_cache:  # so the read reaches the daemon and its local tier
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, MiB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _wait_for_interrupt(mnt: Path, server: DevS3Server) -> None:
    # Inside the suppress before saying so: a Ctrl-C right after the prompt is still caught.
    with contextlib.suppress(KeyboardInterrupt):
        print(f"  serving    {mnt} (try: ls -R {mnt}; tieredfs stats {mnt}); S3 at {server.url}")
        print("  press Ctrl-C to unmount and stop", flush=True)
        while True:
            time.sleep(3600)


class _DemoMount:
    """`tieredfs mount --foreground` as a child we own by PID; stopped with SIGTERM."""

    def __init__(self, endpoint: str, mnt: Path, tmp: Path):
        self.mnt = mnt
        self.cache_dir = tmp / "cache"
        self.log = tmp / "daemon.log"
        self.cmd = [sys.executable, "-m", "tieredfs", "mount", f"s3://{BUCKET}", str(mnt),
                    "--endpoint-url", endpoint, "--cache-dir", str(self.cache_dir), "--foreground"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "_DemoMount":
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | DEMO_CREDENTIALS
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        try:
            wait_until(lambda: os.path.ismount(self.mnt) or self.proc.poll() is not None, 30)
            if not os.path.ismount(self.mnt):
                raise MountError(self._failure())
        except BaseException:
            self.__exit__()
            raise
        return self

    def _failure(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        for line in reversed(lines):
            if line.startswith("tieredfs: error: "):
                return line[len("tieredfs: error: "):]
        return f"the demo mount did not come up; its last log line: {lines[-1] if lines else '(none)'}"

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the daemon unmounts on SIGTERM
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if _in_mount_table(self.mnt):  # also a dead mount, which os.path.ismount does not see
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=30)


def _in_mount_table(path: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)
