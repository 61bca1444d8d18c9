"""The checks every GET body passes, whichever HTTP client received it.

Every ranged GET is pinned to an ETag with If-Match and its body length is checked: botocore
does not verify ranged bodies, and a short body must become a retry, never wrong bytes. A
GET that covers a whole object asks for its full-object checksum (verified by the client
where the object has one) and, for a single-part object stored without SSE-KMS or SSE-C,
its body is checked against its ETag, the MD5 of the body. Whether an ETag is an MD5 is
decided per object from its form and headers, never from the bytes: a mismatch that repeats
is a corruption that repeats, and is refused. A part of an object has no checksum S3 would
send (docs/reliability.md).
"""

import base64
import functools
import hashlib
import time
import zlib
from dataclasses import dataclass

from ..blocks import ObjectVersion
from ..stats import Counters
from .s3_retry import Retry

_MD5_HEX = frozenset("0123456789abcdef")
_HASHES = {"x-amz-checksum-sha1": hashlib.sha1, "x-amz-checksum-sha256": hashlib.sha256}
# The full-object checksums only awscrt computes here (botocore, too, needs awscrt for them).
CRT_ONLY = frozenset({"x-amz-checksum-crc32c", "x-amz-checksum-crc64nvme"})


@dataclass(frozen=True)
class Answer:
    """What a GET's checks need of its response headers, as either client reports them."""

    content_range: str = ""
    sse: str = "AES256"  # x-amz-server-side-encryption (absent: S3's default, AES256)
    sse_customer: bool = False  # SSE-C
    # Full-object checksum headers the client did not verify itself (lower-case names).
    checksums: dict[str, str] | None = None


def read_pieces(read, most: int, pieces: list[memoryview], stop_at: float, counters: Counters) -> int:
    """Fill `pieces` from read(n) (at most `most` bytes a call) unless the body trickles in
    past the deadline: a read timeout is per socket read, so a server sending a little at a
    time would otherwise hold a read forever. Returns how many bytes arrived; raises Retry
    for a body longer than the pieces (not the range asked for)."""
    got = 0
    for view in pieces:
        pos = 0
        while pos < len(view) and (chunk := read(min(most, len(view) - pos))):
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
            if time.monotonic() > stop_at:
                counters.add("slow_bodies")
                raise Retry(f"body still arriving at the deadline ({got + pos} bytes)")
        got += pos
        if pos < len(view):
            return got  # short: check() says so
    if read(1):
        counters.add("short_bodies")
        raise Retry(f"asked {got} bytes, got more")
    return got


def check(obj: ObjectVersion, start: int, pieces: list[memoryview], got: int, answer: Answer,
          etag_md5: bool, counters: Counters) -> None:
    """Raise Retry unless the body is exactly the range asked for and, for a whole object,
    has the MD5 its ETag names (single-part) or else the full-object checksum S3 sent. One
    of the two: a body with its version's MD5 is that version's bytes, and a second digest
    of it is CPU for nothing."""
    length = sum(len(p) for p in pieces)
    if got != length or (answer.content_range and not answer.content_range.startswith(f"bytes {start}-")):
        counters.add("short_bodies")
        raise Retry(f"asked {length} bytes at {start}, got {got} ({answer.content_range})")
    if start == 0 and length == obj.size:
        if _md5_checkable(etag_md5, obj.etag, answer):
            _check_md5(obj, pieces, counters)
        elif answer.checksums:
            check_full_object(obj, answer.checksums, pieces, counters)


def _md5_checkable(enabled: bool, etag: str, answer: Answer) -> bool:
    """A single-part object's ETag is its MD5 (32 hex digits; a multipart one ends in -N),
    unless SSE-KMS or SSE-C encrypted it. Off with --no-etag-md5."""
    return (enabled and len(etag) == 32 and set(etag.lower()) <= _MD5_HEX
            and answer.sse == "AES256" and not answer.sse_customer)


def _check_md5(obj: ObjectVersion, pieces: list, counters: Counters) -> None:
    md5 = hashlib.md5()
    for piece in pieces:
        md5.update(piece)
    digest = md5.hexdigest()
    if digest == obj.etag.lower():
        return
    counters.add("checksum_mismatches")
    raise Retry(f"body of {obj.key!r} has MD5 {digest}, its ETag says {obj.etag} (a store "
                "whose single-part ETags are not MD5s needs --no-etag-md5)")


def check_full_object(obj: ObjectVersion, headers: dict, pieces: list, counters: Counters) -> None:
    """Verify the full-object checksums S3 sent with a whole-object GET (header names in
    lower case). A checksum of parts (-N, COMPOSITE) covers no body as a whole and is left
    alone; so is a CRC whose code cannot be loaded (no awscrt)."""
    if headers.get("x-amz-checksum-type", "FULL_OBJECT").upper() != "FULL_OBJECT":
        return
    crcs = _crcs()
    for name, value in headers.items():
        if (name in crcs or name in _HASHES) and "-" not in value \
                and base64.b64encode(_digest(name, pieces, crcs)).decode() != value:
            counters.add("checksum_mismatches")
            raise Retry(f"body of {obj.key!r} does not match its {name}")


@functools.cache
def _crcs() -> dict:
    """{header: (crc function, digest size)}: crc32 from zlib; crc32c and crc64nvme from
    awscrt, imported only when a GET first has a checksum to verify (not at start-up)."""
    crcs = {"x-amz-checksum-crc32": (zlib.crc32, 4)}
    try:
        from awscrt import checksums
    except ImportError:
        return crcs
    crcs["x-amz-checksum-crc32c"] = (checksums.crc32c, 4)
    if hasattr(checksums, "crc64nvme"):  # awscrt >= 0.23
        crcs["x-amz-checksum-crc64nvme"] = (checksums.crc64nvme, 8)
    return crcs


def _digest(name: str, pieces: list, crcs: dict) -> bytes:
    if name in _HASHES:
        h = _HASHES[name]()
        for piece in pieces:
            h.update(piece)
        return h.digest()
    fn, size = crcs[name]
    crc = 0
    for piece in pieces:
        crc = fn(piece, crc)
    return crc.to_bytes(size, "big")
