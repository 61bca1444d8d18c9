"""GETs through awscrt, the AWS Common Runtime's HTTP client (the only module that imports awscrt).

botocore spends ~1.8 ms of CPU on a small GET here; awscrt's C client a fraction of that
(bench/http_clients.py, docs/performance-notes.md). One GET is one HTTP request on a
connection of our own bounded pool: no retries, part splitting or buffer pool of awscrt's
S3Client, so the retry policy, deadline and checks are the ones every GET has
(tiers/s3_retry.py, tiers/s3_body.py). Only credentials come from botocore: each request is
signed with botocore's current ones, so temporary credentials botocore refreshes are used
from the next request on.

awscrt runs its own event-loop threads; they call on_response/on_body, and a worker thread
(never the trio thread) waits on the request's future, bounded by the read timeout between
bytes and by the request's deadline. Past either, the connection is closed, which ends the
request in awscrt.
"""

import ctypes
import re
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import quote, urlsplit
from urllib.request import getproxies_environment, proxy_bypass_environment

from awscrt import auth, exceptions, http, io

from ..blocks import ObjectVersion
from .s3_body import Answer
from .s3_retry import Retry, RetryLoop, Unreachable

_ERROR_BODY = 64 * 1024  # an error answer's XML is read up to this much, for its <Code>
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_CLOSE_WAIT = 5.0  # after closing a connection, how long its request may take to end


class CrtGets:
    def __init__(self, bucket: str, *, endpoint_url: str, region: str, style: str, credentials,
                 connect_timeout: float, read_timeout: float, threads: int, loop: RetryLoop,
                 ca_bundle: str | None = None):
        self._loop = loop
        self._credentials = credentials  # () -> botocore's frozen credentials
        self._region = region
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        u = urlsplit(endpoint_url)
        tls = u.scheme == "https"
        self._port = u.port or (443 if tls else 80)
        host = u.hostname
        if style == "virtual" and _dns_bucket(bucket, tls):
            host, self._prefix = f"{bucket}.{host}", ""
        else:
            self._prefix = f"/{quote(bucket)}"
        self._host = host
        self._host_header = host if u.port is None else f"{host}:{u.port}"
        elg = io.EventLoopGroup(threads)
        self._bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
        self._socket = io.SocketOptions()
        self._socket.connect_timeout_ms = max(1, int(connect_timeout * 1000))
        self._tls = None
        if tls:
            options = io.TlsContextOptions()
            if ca_bundle:  # AWS_CA_BUNDLE or ca_bundle in the AWS config, as botocore trusts
                options.override_default_trust_store_from_path(ca_filepath=ca_bundle)
            self._tls = io.ClientTlsContext(options).new_connection_options()
            self._tls.set_server_name(host)
        self._proxy = _proxy_for(u.scheme, host)
        self._idle: list = []  # open connections no request is using (at most max_requests)
        self._lock = threading.Lock()
        self._signed_with = None
        self._signing = None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def get(self, obj: ObjectVersion, start: int, pieces: list[memoryview], whole: bool,
            stop_at: float) -> tuple[int, Answer]:
        """One attempt: a ranged GET pinned to obj.etag, received into `pieces`. Returns the
        bytes received and what the checks need of the headers; raises Retry, Unreachable or
        a final error (tiers/s3_retry.py)."""
        self._loop.counters.add("crt_gets")
        request = self._request(obj, start, pieces, whole)
        self._wait(auth.aws_sign_request(request, self._signing_config()), stop_at, "signing")
        received, conn = self._exchange(request, pieces, stop_at)
        return self._answer(received, conn, pieces, whole, obj)

    def begin(self, obj: ObjectVersion, start: int, pieces: list[memoryview], whole: bool) -> "Begun | None":
        """The same attempt started without waiting for anything, for the trio thread: on a
        kept-alive connection, signed with the credentials the last waiting GET used. None
        when that cannot be (no idle connection, no signing config yet, a connection that
        fails at once): the caller then takes the waiting path. Its end: `future` is done,
        then `end(begun)`; or `abandon(begun)`."""
        signing = self._signing
        if not self._lock.acquire(blocking=False):  # the trio thread never waits for a worker
            return None
        try:
            conn = self._idle.pop() if self._idle else None
        finally:
            self._lock.release()
        if signing is None or conn is None or not conn.is_open():
            if conn is not None:
                conn.close()
            return None
        request = self._request(obj, start, pieces, whole)
        signed = auth.aws_sign_request(request, signing)
        if not signed.done() or signed.exception() is not None:  # static credentials sign at once
            self._keep(conn, wait=False)  # unused
            return None
        received = _Received(pieces)
        try:
            stream = conn.request(request, on_response=received.on_response, on_body=received.on_body)
            stream.activate()
        except exceptions.AwsCrtError:
            conn.close()
            return None
        self._loop.counters.add("crt_gets")
        return Begun(obj, start, pieces, whole, received, conn, stream.completion_future)

    def end(self, begun: "Begun") -> tuple[int, Answer]:
        """What get() returns, for a begun attempt whose future is done."""
        try:
            begun.future.result(timeout=0)
        except Exception as e:
            begun.conn.close()
            raise Unreachable(f"awscrt: {getattr(e, 'name', type(e).__name__)}") from None
        return self._answer(begun.received, begun.conn, begun.pieces, begun.whole, begun.obj, wait=False)

    @staticmethod
    def abandon(begun: "Begun") -> None:
        """Give up on a begun attempt: later bytes go nowhere, the connection ends it."""
        begun.received.abandoned = True
        begun.conn.close()

    def _request(self, obj: ObjectVersion, start: int, pieces: list[memoryview], whole: bool):
        length = sum(len(p) for p in pieces)
        headers = [("Host", self._host_header), ("If-Match", f'"{obj.etag}"'),
                   ("Range", f"bytes={start}-{start + length - 1}")]
        if whole:  # S3 sends a full-object checksum only for a GET of the whole object, if asked
            headers.append(("x-amz-checksum-mode", "ENABLED"))
        return http.HttpRequest("GET", f"{self._prefix}/{quote(obj.key, safe='/~')}", http.HttpHeaders(headers))

    def _keep(self, conn, wait: bool = True) -> None:
        """Back to the idle connections; closed instead if the lock is busy and the caller is
        the trio thread (wait=False), which never waits for a worker holding it."""
        if not self._lock.acquire(blocking=wait):
            conn.close()
            return
        try:
            self._idle.append(conn)
        finally:
            self._lock.release()

    def _answer(self, received: "_Received", conn, pieces: list[memoryview], whole: bool,
                obj: ObjectVersion, wait: bool = True) -> tuple[int, Answer]:
        """The connection kept or closed; the response's status and checks."""
        if received.headers.get("connection", "").lower() == "close" or not conn.is_open():
            conn.close()
        else:
            self._keep(conn, wait)
        if received.status not in (200, 206):
            match = _CODE.search(received.error)
            code = match.group(1).decode(errors="replace") if match else str(received.status)
            raise self._loop.answered("get", code, received.status)
        length = sum(len(p) for p in pieces)
        if received.overflow:
            self._loop.counters.add("short_bodies")  # too long: not the range asked for
            raise Retry(f"asked {length} bytes, got more")
        h = received.headers
        return received.got, Answer(h.get("content-range", ""), h.get("x-amz-server-side-encryption", "AES256"),
                                    "x-amz-server-side-encryption-customer-algorithm" in h,
                                    checksums=h if whole else None)

    def _exchange(self, request, pieces: list[memoryview], stop_at: float) -> tuple["_Received", object]:
        """Send the request and receive its response. A kept-alive connection the server closed
        while idle fails before any answer: that one is retried at once on a new connection,
        as urllib3 does, rather than costing an attempt and a backoff."""
        conn, reused = self._connection(stop_at, fresh=False)
        while True:
            received = _Received(pieces)
            try:
                stream = conn.request(request, on_response=received.on_response, on_body=received.on_body)
                stream.activate()
                self._wait_for(stream.completion_future, received, conn, stop_at)
                return received, conn
            except exceptions.AwsCrtError as e:
                conn.close()
                if not reused or received.status:
                    raise Unreachable(f"awscrt: {e.name}") from None
            conn, reused = self._connection(stop_at, fresh=True)

    def _signing_config(self):
        """A signing config over botocore's current credentials: remade only when they change
        (botocore refreshes temporary ones itself, in this worker thread)."""
        frozen = self._credentials()
        key = (frozen.access_key, frozen.secret_key, frozen.token)
        with self._lock:
            if key != self._signed_with:
                self._signing = auth.AwsSigningConfig(
                    algorithm=auth.AwsSigningAlgorithm.V4,
                    signature_type=auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
                    credentials_provider=auth.AwsCredentialsProvider.new_static(*key),
                    region=self._region, service="s3",
                    use_double_uri_encode=False, should_normalize_uri_path=False,  # S3's rules
                    signed_body_value=auth.AwsSignedBodyValue.EMPTY_SHA256,
                    signed_body_header_type=auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256)
                self._signed_with = key
            return self._signing

    def _connection(self, stop_at: float, fresh: bool) -> tuple[object, bool]:
        """(an open connection, whether it was kept from an earlier request)."""
        with self._lock:
            while self._idle and not fresh:
                conn = self._idle.pop()
                if conn.is_open():
                    return conn, True
        future = http.HttpClientConnection.new(
            host_name=self._host, port=self._port, bootstrap=self._bootstrap, socket_options=self._socket,
            tls_connection_options=self._tls, proxy_options=self._proxy)
        try:
            return self._wait(future, min(stop_at, time.monotonic() + self._connect_timeout + 1.0), "connect"), False
        except Unreachable:
            # A connection made after we gave up is closed as it arrives, never leaked.
            future.add_done_callback(lambda f: f.exception() is None and f.result().close())
            raise

    @staticmethod
    def _wait(future, stop_at: float, what: str):
        try:
            return future.result(timeout=max(0.0, stop_at - time.monotonic()))
        except FutureTimeout:
            raise Unreachable(f"awscrt: {what} timed out") from None
        except exceptions.AwsCrtError as e:
            raise Unreachable(f"awscrt: {what}: {e.name}") from None

    def _wait_for(self, future, received: "_Received", conn, stop_at: float) -> None:
        """Until the request ends, or nothing arrives for the read timeout, or the deadline
        passes: then close the connection and wait (bounded) for awscrt to end the request."""
        while True:
            limit = min(stop_at, received.last + self._read_timeout)
            try:
                future.result(timeout=max(0.0, limit - time.monotonic()))
                return
            except FutureTimeout:
                now = time.monotonic()
                if now < stop_at and now < received.last + self._read_timeout:
                    continue  # bytes arrived meanwhile
            received.abandoned = True
            conn.close()
            try:
                future.result(timeout=_CLOSE_WAIT)
            except Exception:
                pass  # the request ended with the connection, as it should
            if received.status and now >= stop_at:
                self._loop.counters.add("slow_bodies")
                raise Retry(f"body still arriving at the deadline ({received.got} bytes)")
            raise Unreachable("awscrt: read timed out")


_pinned = threading.local()


def _keep_thread_state() -> None:
    """Called from awscrt's event-loop thread: give it a Python thread state for good.
    Without one, each callback into Python (headers, every body chunk, completion) makes a
    thread state and deletes it: on 3.11, an mmap and munmap of its frame stack each time,
    ~4.7 pairs per small GET (strace -k), and fresh pages to fault in. One extra
    PyGILState_Ensure, never released, keeps the state alive; each callback still takes
    and gives back the GIL as before. One state per event-loop thread (--crt-threads)."""
    if not getattr(_pinned, "kept", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _pinned.kept = True


@dataclass
class Begun:
    """A GET attempt started by begin(): what end() needs once `future` is done."""

    obj: ObjectVersion
    start: int
    pieces: list[memoryview]
    whole: bool
    received: "_Received"
    conn: object
    future: object  # concurrent.futures.Future: done when the response has ended


class _Received:
    """A response as awscrt's event-loop thread hands it over: status, headers, and the body
    copied straight into the pieces (an error's body kept, bounded, for its code)."""

    def __init__(self, pieces: list[memoryview]):
        self.pieces = pieces
        self.status = 0
        self.headers: dict[str, str] = {}
        self.error = bytearray()
        self.got = 0
        self.overflow = False
        self.abandoned = False  # the waiter gave up: later bytes go nowhere
        self.last = time.monotonic()  # when anything last arrived
        self._index = self._pos = 0

    def on_response(self, status_code, headers, **_):
        _keep_thread_state()
        self.status = status_code
        self.headers = {k.lower(): v for k, v in headers}
        self.last = time.monotonic()

    def on_body(self, chunk, **_):
        self.last = time.monotonic()
        if self.abandoned:
            return
        if self.status not in (200, 206):
            self.error += chunk[:_ERROR_BODY - len(self.error)]
            return
        view = memoryview(chunk)
        while view:
            if self._index == len(self.pieces):
                self.overflow = True
                return
            piece = self.pieces[self._index]
            n = min(len(view), len(piece) - self._pos)
            piece[self._pos:self._pos + n] = view[:n]
            self._pos += n
            self.got += n
            view = view[n:]
            if self._pos == len(piece):
                self._index, self._pos = self._index + 1, 0


def _dns_bucket(bucket: str, tls: bool) -> bool:
    """Can the bucket go in the host name? As botocore decides: a DNS label, and no dots
    over TLS (a dotted name would not match the certificate)."""
    return (re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) is not None
            and ".." not in bucket and not (tls and "." in bucket))


def _proxy_for(scheme: str, host: str):
    """HTTP(S)_PROXY/NO_PROXY as botocore honours them."""
    url = getproxies_environment().get(scheme)
    if not url or proxy_bypass_environment(host):
        return None
    p = urlsplit(url if "://" in url else f"http://{url}")
    return http.HttpProxyOptions(p.hostname, p.port or 80)
