"""Detaching from the terminal once the mount is ready.

The fork happens before any thread or S3 client exists. The parent waits on a pipe
for the child's verdict, so `tieredfs mount` returns 0 only once the mount answers,
and prints the child's one-line error otherwise.
"""

import logging
import os
from typing import Callable

from .errors import MountError, expected

log = logging.getLogger(__name__)


def run_detached(start: Callable[[Callable[[], None]], None], log_hint: str) -> None:
    """Run `start(on_ready)` in a detached child; return when it is ready, raise if not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        verdict = _read_all(read_end)
        if verdict.startswith("OK"):
            return
        os.waitpid(pid, 0)
        if verdict.startswith("ERR "):
            raise MountError(verdict[4:].strip())
        raise MountError(f"the daemon exited during start-up; see {log_hint}")
    os.close(read_end)
    code = _child(start, write_end)
    os._exit(code)


def _child(start, write_end: int) -> int:
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    pipe = _Verdict(write_end)
    try:
        start(lambda: pipe.tell("OK"))
        return 0
    except BaseException as e:
        if (error := expected(e)) is not None:  # (trio wraps one from inside the mount's tasks)
            log.error("event=start_failed error=%r", str(error))
            pipe.tell(f"ERR {error}")
            return 1
        log.exception("event=daemon_crashed")
        pipe.tell(f"ERR unexpected failure ({type(e).__name__}: {e}), see the log")
        return 1


class _Verdict:
    """The pipe to the waiting parent: written once, then closed."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def tell(self, message: str) -> None:
        if self.fd is None:
            return  # the parent already has its answer (a failure after readiness goes to the log)
        os.write(self.fd, message.encode() + b"\n")
        os.close(self.fd)
        self.fd = None


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")
