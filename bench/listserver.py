"""A minimal S3 endpoint over a local directory, for listing benchmarks (bigdir).

rclone serve s3 lists a directory of 100,000 files in ~3.5 s per 1,000-key page here (it
reads the whole directory for each page), so a first `ls` would measure rclone for six
minutes, not the daemon. This server indexes the keys once at start, sorted as S3 keeps
them, and answers a page in O(page): HeadBucket, ListObjectsV2 (prefix, delimiter,
continuation token, max-keys), and GET/HEAD of an object with Range and If-Match. Nothing
else; no authentication checked. Threads in this process, on 127.0.0.1.
"""

import bisect
import hashlib
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

PAGE = 1000
_MODIFIED = "2026-01-01T00:00:00.000Z"


class ListServer:
    kind = "listserver"

    def __init__(self, root: Path | None, bucket: str, synthetic: int = 0):
        """Over the files under root/bucket; or, with `synthetic` N and no root, over N objects
        made up in memory (`synthetic_body`), which also takes PUTs and keeps them in memory:
        enough for `tieredfs pack` over more objects than a disk of files would hold quickly."""
        self.root, self.bucket = root, bucket
        self.base = root / bucket if root is not None else None
        # Sizes and ETags indexed once, as S3 keeps them: a listing reads no file.
        self.meta: dict[str, tuple[int, str]] = {}
        self.stored: dict[str, bytes] = {}  # synthetic: bodies PUT, by key
        self.latency = 0.0  # seconds before each GET, HEAD or LIST is answered (--latency-ms)
        self._lock = threading.Lock()
        if self.base is not None:
            for p in self.base.rglob("*"):
                if p.is_file():
                    data = p.read_bytes()
                    self.meta[str(p.relative_to(self.base))] = (len(data), hashlib.md5(data).hexdigest())
        for i in range(synthetic):
            key = synthetic_key(i)
            self.meta[key] = (len(synthetic_body(key)), hashlib.md5(synthetic_body(key)).hexdigest())
        self.keys = sorted(self.meta)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.owner = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "ListServer":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def body(self, key: str) -> bytes:
        if key in self.stored:
            return self.stored[key]
        return synthetic_body(key) if self.base is None else (self.base / key).read_bytes()

    def put(self, key: str, data: bytes) -> str:
        etag = hashlib.md5(data).hexdigest()
        with self._lock:
            if key not in self.meta:
                bisect.insort(self.keys, key)
            self.meta[key], self.stored[key] = (len(data), etag), data
        return etag

    def page(self, prefix: str, delimiter: str, token: str, max_keys: int) -> tuple[list, list, str]:
        """(objects, common prefixes, next token or "") of one page, in O(page)."""
        i = bisect.bisect_left(self.keys, max(prefix, token))
        if token and i < len(self.keys) and self.keys[i] == token:
            i += 1
        objects, prefixes = [], []
        while i < len(self.keys) and len(objects) + len(prefixes) < max_keys:
            key = self.keys[i]
            if not key.startswith(prefix):
                break
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = key[:cut + len(delimiter)]
                prefixes.append(common)
                # The last key under this prefix is the token: the next page starts past it.
                i = bisect.bisect_left(self.keys, common[:-1] + chr(ord(common[-1]) + 1))
                last = self.keys[i - 1]
            else:
                objects.append(key)
                last = key
                i += 1
        more = i < len(self.keys) and self.keys[i].startswith(prefix)
        return objects, prefixes, last if more else ""


def synthetic_key(i: int) -> str:
    return f"data/d{i // 1000:04d}/f{i:07d}.bin"


def synthetic_body(key: str) -> bytes:
    """64 B to ~2 KiB, the same bytes for a key every time."""
    seed = hashlib.md5(key.encode()).digest()
    return seed * (4 + seed[0] % 124)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle's algorithm and the client's
    # delayed ACK hold every response ~40 ms.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _answer(self, head: bool):
        owner: ListServer = self.server.owner
        time.sleep(owner.latency)
        url = urlsplit(self.path)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        if bucket != owner.bucket:
            return self._send(404, b"", {})
        if not key:
            if head:
                return self._send(200, b"", {})
            q = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            return self._list(owner, q)
        if key not in owner.meta:
            return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", {})
        etag = owner.meta[key][1]
        if self.headers.get("If-Match", etag).strip('"') != etag:
            return self._send(412, b"<Error><Code>PreconditionFailed</Code></Error>", {})
        data = owner.body(key)
        headers = {"ETag": f'"{etag}"', "Last-Modified": formatdate(usegmt=True)}
        rng = self.headers.get("Range")
        if rng:
            lo, _, hi = rng.removeprefix("bytes=").partition("-")
            lo, hi = int(lo), min(int(hi or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
            return self._send(206, data[lo:hi + 1], headers, head)
        self._send(200, data, headers, head)

    def do_PUT(self):
        owner: ListServer = self.server.owner
        bucket, _, key = unquote(urlsplit(self.path).path).lstrip("/").partition("/")
        if owner.base is not None or bucket != owner.bucket or not key:
            return self._send(403, b"<Error><Code>AccessDenied</Code></Error>", {})
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(200, b"", {"ETag": f'"{owner.put(key, data)}"'})

    def _list(self, owner: ListServer, q: dict):
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        token = q.get("continuation-token", "")
        max_keys = min(PAGE, int(q.get("max-keys", PAGE)))
        objects, prefixes, next_token = owner.page(prefix, delimiter, token, max_keys)
        parts = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                 f'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>{owner.bucket}</Name>'
                 f"<Prefix>{escape(prefix)}</Prefix><Delimiter>{escape(delimiter)}</Delimiter>"
                 f"<MaxKeys>{max_keys}</MaxKeys><KeyCount>{len(objects) + len(prefixes)}</KeyCount>"
                 f"<IsTruncated>{'true' if next_token else 'false'}</IsTruncated>"]
        if next_token:
            parts.append(f"<NextContinuationToken>{escape(next_token)}</NextContinuationToken>")
        for key in objects:
            size, etag = owner.meta[key]
            parts.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{_MODIFIED}</LastModified>"
                         f'<ETag>"{etag}"</ETag><Size>{size}</Size>'
                         f"<StorageClass>STANDARD</StorageClass></Contents>")
        for p in prefixes:
            parts.append(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>")
        parts.append("</ListBucketResult>")
        self._send(200, "".join(parts).encode(), {"Content-Type": "application/xml"})

    def _send(self, status: int, body: bytes, headers: dict, head: bool = False):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def main() -> None:
    """python -m bench.listserver --synthetic N [--bucket B]: serve N made-up objects until
    stdin closes; prints the URL first. In a process of its own, so that a benchmark's
    peak RSS of another child is not its own: a child's ru_maxrss starts at its parent's."""
    import argparse
    import sys

    p = argparse.ArgumentParser()
    p.add_argument("--synthetic", type=int, required=True)
    p.add_argument("--bucket", default="bench")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added before each GET, HEAD or LIST")
    args = p.parse_args()
    server = ListServer(None, args.bucket, synthetic=args.synthetic)
    server.latency = args.latency_ms / 1000
    server.start()
    print(server.url, flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
