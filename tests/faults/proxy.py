"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto S3 server.

The test process drives it through a Python API while a real daemon talks to it:

    proxy.add("error", rate=0.3, status=503, code="SlowDown")   # 30 % of GETs
    proxy.add("stall", limit=1)                                 # the next GET never answers
    proxy.add("stall_body", limit=1)                            # ... or stops mid-body
    proxy.add("outage", kinds=ALL)                              # every request is reset
    proxy.clear()

Faults are chosen per request: the first rule whose `kinds` match the request type
(GET, LIST, HEAD, ...), whose `limit` is not used up and whose `rate` draw succeeds
applies. Faults on a response body (reset, short, flip, bandwidth) are chosen only for
successful responses that have a body, after any latency, so the two can combine. Every response closes its connection, as
moto's own server does, so each request is one connection.
"""

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tieredfs.devserver import _kind as request_kind

ALL = ("GET", "LIST", "HEAD", "PUT", "POST", "DELETE")
_BEFORE = frozenset({"outage", "stall", "error", "latency"})  # decided before S3 is asked
_ON_BODY = frozenset({"reset", "stall_body", "short_honest", "short_lying", "flip",
                      "bandwidth"})  # on a 200/206 body
ACTIONS = _BEFORE | _ON_BODY
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


@dataclass
class Rule:
    action: str
    kinds: tuple[str, ...] = ("GET",)
    rate: float = 1.0
    limit: int | None = None
    status: int = 503  # error
    code: str = "SlowDown"  # error
    seconds: float = 0.0  # latency: added delay; stall(_body): silence before a reset (0: until stop())
    bytes_per_sec: int = 0  # bandwidth
    at: int | None = None  # flip: this byte every time (a deterministic corruption), else a random one
    used: int = 0


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 7):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._counts: Counter = Counter()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control -----------------------------------------------------------------

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # stalled requests give up their connections
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def add(self, action: str, **kwargs) -> Rule:
        if action not in ACTIONS:
            raise ValueError(f"unknown fault {action!r} (one of {sorted(ACTIONS)})")
        rule = Rule(action, **kwargs)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def counts(self) -> Counter:
        """requests.KIND for every request seen, faults.ACTION for every fault injected."""
        with self._lock:
            return Counter(self._counts)

    # --- used by the handler threads -------------------------------------------------

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _choose(self, kind: str, actions: frozenset[str]) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if (rule.action not in actions or kind not in rule.kinds
                        or (rule.limit is not None and rule.used >= rule.limit)):
                    continue
                if self._rng.random() < rule.rate:
                    rule.used += 1
                    self._counts[f"faults.{rule.action}"] += 1
                    return rule
            return None

    def _flip_position(self, n: int) -> int:
        with self._lock:
            return self._rng.randrange(n)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass  # the counters say what happened; per-request lines would flood pytest's output

    def do_request(self):
        self.close_connection = True
        self.owner._count(f"host.{self.headers.get('Host', '')}")
        if self.path.startswith("http://"):  # asked as a forward proxy (HTTP_PROXY)
            self.path = "/" + self.path.split("/", 3)[3] if self.path.count("/") >= 3 else "/"
        path, _, query = self.path.partition("?")
        kind = request_kind({"REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query})
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.owner._count(f"requests.{kind}")
        rule = self.owner._choose(kind, _BEFORE)
        action = rule.action if rule else None
        if action == "outage":
            return self._reset()
        if action == "stall":
            self.owner._stop.wait(rule.seconds or None)
            return self._reset()
        if action == "error":
            return self._error(rule)
        if action == "latency":
            time.sleep(rule.seconds)
        status, reason, headers, payload = self._forward(body)
        rule = self.owner._choose(kind, _ON_BODY) if status in (200, 206) and payload else None
        if rule is None:
            return self._send(status, reason, headers, payload, len(payload))
        action = rule.action
        half = payload[:len(payload) // 2]
        if action in ("reset", "stall_body"):
            self._send(status, reason, headers, half, len(payload))
            self.wfile.flush()
            if action == "stall_body":  # half the body, then silence
                self.owner._stop.wait(rule.seconds or None)
            return self._reset()
        if action == "short_honest":
            return self._send(status, reason, headers, half, len(half))
        if action == "short_lying":
            return self._send(status, reason, headers, half, len(payload))
        if action == "flip":
            flipped = bytearray(payload)
            pos = self.owner._flip_position(len(flipped)) if rule.at is None else rule.at % len(flipped)
            flipped[pos] ^= 0x20
            return self._send(status, reason, headers, bytes(flipped), len(flipped))
        return self._send(status, reason, headers, payload, len(payload), rule.bytes_per_sec)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_request

    def handle(self):
        try:
            super().handle()
        except OSError:
            pass  # the daemon gave up on this connection (its timeout), or we reset it

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass  # already reset

    def _forward(self, body: bytes):
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def _send(self, status, reason, headers, payload: bytes, content_length: int, bytes_per_sec: int = 0):
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":  # no body, but the object's length is the answer
            content_length = dict((k.lower(), v) for k, v in headers).get("content-length", 0)
        self.send_header("Content-Length", str(content_length))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if not bytes_per_sec:
            self.wfile.write(payload)
            return
        chunk = max(1, bytes_per_sec // 20)
        for pos in range(0, len(payload), chunk):
            self.wfile.write(payload[pos:pos + chunk])
            self.wfile.flush()
            time.sleep(len(payload[pos:pos + chunk]) / bytes_per_sec)

    def _error(self, rule: Rule):
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.code}</Code>'
                f"<Message>injected by the fault proxy</Message></Error>").encode()
        self._send(rule.status, "Injected", [("Content-Type", "application/xml")], body, len(body))

    def _reset(self):
        """Drop the connection with a TCP RST, as a crashed peer or a middlebox would."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
