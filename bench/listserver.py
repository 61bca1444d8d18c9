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
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

PAGE = 1000
_MODIFIED = "2026-01-01T00:00:00.000Z"


class ListServer:
    kind = "listserver"

    def __init__(self, root: Path, bucket: str):
        self.root, self.bucket = root, bucket
        base = root / bucket
        self.base = base
        # Sizes and ETags indexed once, as S3 keeps them: a listing reads no file.
        self.meta: dict[str, tuple[int, str]] = {}
        for p in base.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                self.meta[str(p.relative_to(base))] = (len(data), hashlib.md5(data).hexdigest())
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _answer(self, head: bool):
        owner: ListServer = self.server.owner
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
        data = (owner.base / key).read_bytes()
        headers = {"ETag": f'"{etag}"', "Last-Modified": formatdate(usegmt=True)}
        rng = self.headers.get("Range")
        if rng:
            lo, _, hi = rng.removeprefix("bytes=").partition("-")
            lo, hi = int(lo), min(int(hi or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {lo}-{hi}/{len(data)}"
            return self._send(206, data[lo:hi + 1], headers, head)
        self._send(200, data, headers, head)

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
