"""An embedded S3 endpoint on 127.0.0.1 for the demo, the tests and the benchmarks.

It is moto's real S3 protocol server in a child process, wrapped in a middleware that
counts requests by type so tests can assert "the second read made 0 GETs" on the
server side. Counts: GET /__tieredfs/counts, reset: POST /__tieredfs/counts.

Run: python -m tieredfs.devserver --port 0   (prints "READY <port>")
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter

from .errors import EndpointUnreachable

COUNTS_PATH = "/__tieredfs/counts"
MOTO_FLOOR = "5.2.5"  # the first moto with MotoRequestHandler; pyproject.toml's floor


class CountingApp:
    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.counts: Counter = Counter()

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == COUNTS_PATH:
            return self._counts(environ, start_response)
        kind = _kind(environ)

        def counting_start(status, headers, exc_info=None):
            with self.lock:
                self.counts[kind] += 1
                if kind == "GET" and status.startswith("20"):
                    length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                    self.counts["GET_BYTES"] += int(length)
            return start_response(status, headers, exc_info)

        return self.app(environ, counting_start)

    def _counts(self, environ, start_response):
        with self.lock:
            body = json.dumps(self.counts).encode()
            if environ["REQUEST_METHOD"] == "POST":
                self.counts.clear()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]


def _kind(environ) -> str:
    method = environ["REQUEST_METHOD"]
    query = environ.get("QUERY_STRING", "")
    path = environ.get("PATH_INFO", "").strip("/")
    if method == "GET" and ("list-type" in query or "/" not in path):
        return "LIST"
    return method


def serve(port: int, require_auth: bool) -> None:
    if require_auth:
        # moto then checks access keys against its IAM backend: unknown keys get 403.
        os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    try:
        from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                                   create_backend_app)
        from werkzeug.serving import make_server
    except ImportError as e:
        # Said on stdout, where the parent waits for READY: stderr is the server's request log.
        print(f"ERROR {e}", flush=True)
        sys.exit(1)

    app = CountingApp(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevS3Server:
    """Starts the server in a child process; always stop() it (or use `with`)."""

    def __init__(self, require_auth: bool = False):
        self.require_auth = require_auth
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "DevS3Server":
        cmd = [sys.executable, "-m", "tieredfs.devserver", "--port", "0"]
        if self.require_auth:
            cmd.append("--require-auth")
        # Its own session: a Ctrl-C on the terminal must not stop the server under a live mount.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            why = line.removeprefix("ERROR ").strip() or "it exited before it was ready"
            raise EndpointUnreachable(f"the embedded S3 server did not start: {why} (it needs "
                                      f"moto[server]>={MOTO_FLOOR}: pip install 'tieredfs[demo]')")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def counts(self, reset: bool = False) -> Counter:
        req = urllib.request.Request(self.url + COUNTS_PATH, method="POST" if reset else "GET")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return Counter(json.loads(resp.read()))

    def reset_counts(self) -> None:
        self.counts(reset=True)

    def create_bucket(self, bucket: str) -> None:
        self._put(f"/{bucket}", b"")

    def put(self, bucket: str, key: str, data: bytes) -> None:
        """Upload without boto3 (tiers/s3.py is its only importer): without --require-auth
        moto takes unsigned, path-style PUTs."""
        self._put(f"/{bucket}/{urllib.parse.quote(key, safe='/~')}", data)

    def _put(self, path: str, data: bytes) -> None:
        # An explicit content type, or werkzeug reads the body as a form and stores nothing.
        req = urllib.request.Request(self.url + path, data=data, method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=60):
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--require-auth", action="store_true")
    args = p.parse_args()
    serve(args.port, args.require_auth)


if __name__ == "__main__":
    main()
