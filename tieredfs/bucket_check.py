"""The start-up bucket check, run in a forked process while the daemon starts (issue 19).

Importing botocore, creating an S3 client and asking S3 about the bucket cost ~0.17 s of
CPU, most of start-up after the interpreter itself. Threads would not overlap them with
the daemon's own imports and the FUSE mount (the GIL); a process does, on another core.
The daemon declares itself ready only once the verdict says the bucket answers: a missing
bucket, refused credentials or an unreachable endpoint still fail the mount with one line,
and the mount made meanwhile is undone before `tieredfs mount` returns.

The fork happens before any thread exists (at the start of `tieredfs mount`). If the
checker gives no verdict (killed, crashed), the daemon checks the bucket itself.
"""

import logging
import os
import signal
import threading
from typing import Callable

from . import errors
from .errors import TieredError

log = logging.getLogger(__name__)

_KINDS = ("BucketMissing", "CredentialsRefused", "EndpointUnreachable", "BackendUnavailable")


class BucketCheck:
    def __init__(self, pid: int, fd: int):
        self._pid, self._fd = pid, fd
        self._verdict: str | None = None

    @classmethod
    def start(cls, check: Callable[[], None]) -> "BucketCheck":
        """Fork; the child runs check() (raising a TieredError for a bucket it cannot use).
        botocore is imported first, once for both processes (~90 ms of CPU): the checker then
        makes its client and asks S3 while this process imports and mounts the rest."""
        from .tiers import s3  # noqa: F401

        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the checker: never returns
            os.close(read_end)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os._exit(_child(check, write_end))
        os.close(write_end)
        return cls(pid, read_end)

    def result(self) -> bool:
        """Blocking: True if the bucket answered, False if the checker gave no verdict (the
        caller then checks itself); raises the checker's error, of the same type."""
        if self._verdict is None:
            chunks = []
            while chunk := os.read(self._fd, 4096):
                chunks.append(chunk)
            self._verdict = b"".join(chunks).decode(errors="replace")
            self.close()
        kind, _, message = self._verdict.partition(" ")
        if kind == "OK":
            return True
        if kind in _KINDS:
            raise getattr(errors, kind)(message.strip())
        log.warning("event=bucket_check_lost verdict=%r action=checking_in_the_daemon", self._verdict[:200])
        return False

    def close(self) -> None:
        """Reap the checker (it has exited, or is stopped: a daemon that failed early)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._pid:
            try:
                if os.waitpid(self._pid, os.WNOHANG)[0] == 0:
                    os.kill(self._pid, signal.SIGKILL)
                    os.waitpid(self._pid, 0)
            except ChildProcessError:
                pass  # reaped already (a fork's child does not inherit it)
            self._pid = 0


def _child(check: Callable[[], None], fd: int) -> int:
    try:
        check()
        verdict = "OK"
    except TieredError as e:
        kind = next((k for k in _KINDS if isinstance(e, getattr(errors, k))), "BackendUnavailable")
        verdict = f"{kind} {e}"
    except BaseException as e:  # a bug: said to the daemon, which then checks itself
        verdict = f"CRASH {type(e).__name__}: {e}"
    try:
        os.write(fd, verdict.encode())
    finally:
        os.close(fd)
    return 0


def make_backend(c, counters, buffers=None, http_client: str | None = None, crt_later: bool = False):
    """The mount's S3Backend from its Config (the daemon's, and the checker's own)."""
    from .tiers.s3 import S3Backend

    return S3Backend(
        c.bucket, endpoint_url=c.endpoint_url, region=c.region, max_requests=c.s3_max_requests,
        connect_timeout=c.s3_connect_timeout, read_timeout=c.s3_read_timeout,
        max_attempts=c.s3_max_attempts, deadline=c.read_deadline,
        counters=counters, buffers=buffers, addressing=c.addressing_style, etag_md5=c.etag_md5,
        http_client=http_client or c.http_client, crt_threads=c.crt_threads, crt_later=crt_later)


def check_bucket(c) -> None:
    """What the checker process runs: a HEAD, through botocore. In auto it makes no awscrt
    client (~40 ms to load); with --http-client crt it does, so that a missing awscrt
    fails the mount."""
    from .stats import Registry

    client = "boto3" if c.http_client == "auto" else c.http_client
    make_backend(c, Registry().counters("s3"), http_client=client).check_bucket()


class LazyBackend:
    """An S3Backend made on first use, in whichever thread first needs S3 (or right after
    the mount is ready): creating the client is ~65 ms of CPU that the mount need not wait
    for once the checker has vouched for the bucket. Taking a method (`backend.list_dir`)
    creates nothing; calling it does."""

    def __init__(self, make: Callable, bucket: str, counters):
        self.bucket, self.counters = bucket, counters
        self._make = make
        self._real = None
        self._lock = threading.Lock()

    def real(self):
        if self._real is None:
            with self._lock:
                if self._real is None:
                    self._real = self._make()
        return self._real

    def begin_get(self, *args):
        """None until the client is made: begin_get runs on the trio thread, which must not
        spend the ~65 ms of making it (the first GETs take the waiting path, which does)."""
        return self._real.begin_get(*args) if self._real is not None else None

    def close(self) -> None:
        """Close the client if one was made; a mount that never reached S3 makes none."""
        if self._real is not None:
            self._real.close()

    def gauges(self) -> dict[str, int]:
        return self._real.gauges() if self._real is not None else {"s3.down": 0}

    def __getattr__(self, name: str):
        from .tiers.s3 import S3Backend

        method = callable(getattr(S3Backend, name, None))
        if self._real is not None and method:
            # Once made, the client's methods are this object's own: the next call of one
            # (several per cold GET, on the trio thread) does not come through here.
            value = self.__dict__[name] = getattr(self._real, name)
            return value
        if not method:
            return getattr(self.real(), name)

        def call(*args, **kwargs):
            return getattr(self.real(), name)(*args, **kwargs)

        return call
