"""Fixtures and helpers shared by the fault scenarios (imported by each test module).

Not a conftest.py: tests/conftest.py is imported as `conftest`, and a second module of
that name here would shadow it.

Each scenario records its numbers with `record(...)` into results/last-run.json;
`python tests/faults/report.py` turns that file into the table of docs/reliability.md.
"""

import hashlib
import json
import os
import socketserver
import threading
import time
from pathlib import Path

import pytest

from conftest import read_file
from tieredfs.blocks import ObjectVersion
from test_cache import read_uncached
from proxy import FaultProxy

K = 1024
BS = 64 * K
RESULTS = Path(__file__).parent / "results" / "last-run.json"

# Short bounds so a fault costs seconds, not minutes: a read fails with EIO after
# READ_DEADLINE plus at most one attempt's timeouts.
CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 1.5
READ_DEADLINE = 5.0
FAST = ("--block-size", "64K", "--s3-connect-timeout", str(CONNECT_TIMEOUT),
        "--s3-read-timeout", str(READ_TIMEOUT), "--read-deadline", str(READ_DEADLINE),
        "--s3-max-attempts", "12", "--cache-min-free", "0")
ONE_ATTEMPT = CONNECT_TIMEOUT + READ_TIMEOUT
# The longest a read may take when S3 cannot serve it; margin for 2 shared cores.
EIO_BOUND = READ_DEADLINE + ONE_ATTEMPT + 5.0

_results_lock = threading.Lock()


@pytest.fixture
def proxy(s3server):
    p = FaultProxy(s3server.url).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def via_proxy(mount_factory, proxy):
    """via_proxy(bucket, *extra) -> a Mount whose S3 endpoint is the fault proxy."""

    def factory(bucket: str, *extra: str, **kwargs):
        return mount_factory(bucket, *FAST, *extra, endpoint=proxy.url, **kwargs)

    return factory


def timed(fn, *args):
    """(result or the OSError raised, seconds taken)."""
    start = time.monotonic()
    try:
        result = fn(*args)
    except OSError as e:
        result = e
    return result, time.monotonic() - start


def random_files(put, prefix: str, sizes: list[int]) -> dict[str, bytes]:
    return {f"{prefix}/f{i}.bin": put(f"{prefix}/f{i}.bin", os.urandom(n)) for i, n in enumerate(sizes)}


def s3_stats(mnt) -> dict:
    return {k: v for k, v in mnt.stats().items() if k.startswith("s3.")}


def record(scenario: str, **numbers) -> None:
    """Merge this scenario's numbers into results/last-run.json."""
    with _results_lock:
        RESULTS.parent.mkdir(exist_ok=True)
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        data[scenario] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          **{k: round(v, 3) if isinstance(v, float) else v for k, v in numbers.items()}}
        RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")



class KeepAliveServer(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 server of one object (any path, any range: the whole body) that keeps its
    connections alive, and does `second` to the second request on each connection: "answer",
    "drop" (close it unanswered: a kept-alive connection the server dropped while idle, caught
    in the race where the client has already sent on it), "stall" (never answer), "flip" (a
    byte of the body changed) or "error" (503 SlowDown). Every other request is answered.
    moto and the fault proxy close each connection after one answer: they cannot do this.
    Use as a context manager (it serves in a thread until the block ends)."""

    daemon_threads = allow_reuse_address = True
    BODY = bytes(range(256)) * 40

    def __init__(self, second: str = "answer"):
        self.second, self.connections = second, 0
        self.obj = ObjectVersion("bkt", "k", hashlib.md5(self.BODY).hexdigest(), len(self.BODY))
        self.stop = threading.Event()
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "KeepAliveServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


class _KeepAliveHandler(socketserver.StreamRequestHandler):
    def handle(self):
        server = self.server
        server.connections += 1
        n = 0
        while not server.stop.is_set():
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = self.rfile.readline()
                if not line:
                    return
                head += line
            n += 1
            what = server.second if n == 2 else "answer"
            if what == "drop":
                return
            if what == "stall":
                server.stop.wait()
                return
            status, body = b"200 OK", server.BODY
            if what == "flip":
                body = bytes([body[0] ^ 0x20]) + body[1:]
            elif what == "error":
                status, body = b"503 Slow Down", b"<Error><Code>SlowDown</Code></Error>"
            self.wfile.write(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nETag: \"%s\"\r\n\r\n%s"
                             % (status, len(body), server.obj.etag.encode(), body))
            self.wfile.flush()
