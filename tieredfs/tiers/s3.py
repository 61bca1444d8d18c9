"""Tier 3: S3 through botocore, boto3's core (the only module that imports boto3/botocore).

Every request goes through one semaphore (bounded concurrency, bounded connection
pool) and one retry loop with backoff and a deadline. Every ranged GET is pinned to
an ETag with If-Match and its body length is checked: botocore does not verify
ranged bodies, and a short body must become a retry, never wrong bytes. A GET that
covers a whole object asks for its full-object checksum (ChecksumMode, verified by
botocore where the object has one) and, for a single-part object stored without
SSE-KMS or SSE-C, checks the body against its ETag, the MD5 of the body. Whether an ETag
is an MD5 is decided per object from its form and headers, never from the bytes: a
mismatch that repeats is a corruption that repeats, and is refused. A part of an object
has no checksum S3 would send (docs/reliability.md).

When a request has used its whole deadline without reaching S3 (refused, reset, timed
out), S3 is taken to be down: until a request succeeds again, each one makes a single
attempt, so readers get EIO at once instead of one deadline each (the kernel retries a
failed read, doubling the wait).
"""

import base64
import datetime
import hashlib
import ipaddress
import logging
import random
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.response
import botocore.session
import botocore.utils
import urllib3.exceptions

from ..blocks import BlockRef, ObjectVersion
from ..errors import (
    BackendUnavailable,
    BucketMissing,
    CredentialsRefused,
    EndpointUnreachable,
    ObjectChanged,
    ObjectMissing,
)
from ..memory import BufferPool
from ..stats import Counters

log = logging.getLogger(__name__)

_RETRYABLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "429", "TooManyRequests",
}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken",
               "InvalidToken"}
# A body is checked against the deadline after every socket read (at most _BODY_PIECE bytes),
# or, for a body that can only be read in fixed amounts, every _BODY_CHUNK bytes.
_BODY_PIECE = 1024 * 1024
_BODY_CHUNK = 16 * 1024
_MD5_HEX = frozenset("0123456789abcdef")
_TRANSIENT = (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError)
# Stores that answer only virtual-hosted requests (the bucket in the host name): Alibaba
# Cloud OSS refuses path-style ones (SecondLevelDomainForbidden), Tencent COS for buckets
# made since 2024. AWS itself prefers them.
_VIRTUAL_HOST_SUFFIXES = (".amazonaws.com", ".aliyuncs.com", ".myqcloud.com")


def addressing_style(style: str, endpoint_url: str | None) -> str:
    """'path' or 'virtual' for --addressing-style STYLE; 'auto' is virtual for AWS and the
    stores that need it, path for any other endpoint (MinIO, Ceph, a local server...)."""
    if style != "auto":
        return style
    if not endpoint_url:
        return "virtual"
    host = (urlsplit(endpoint_url).hostname or "").lower()
    try:
        ipaddress.ip_address(host)
        return "path"  # no bucket.IP host name can resolve
    except ValueError:
        pass
    return "virtual" if host.endswith(_VIRTUAL_HOST_SUFFIXES) else "path"


def _body_reader(body) -> tuple:
    """(read(n), the n to ask for) for a response body.

    A plain body is read from urllib3 with read1, one socket read at a time: half the CPU of
    fixed-size reads and never waiting for more bytes than have arrived (bench/: 0.45 against
    1.0 ms of CPU per MiB received). A body botocore wraps to verify a checksum is read
    through that wrapper, so the check still runs.
    """
    raw = getattr(body, "_raw_stream", None)
    if type(body) is botocore.response.StreamingBody and hasattr(raw, "read1"):
        return raw.read1, _BODY_PIECE
    return body.read, _BODY_CHUNK


class _S3OnlyLoader(botocore.loaders.Loader):
    """botocore's loader, except that it does not list every service it knows (~400
    directories) to check that "s3" is one: that listing was 40% of creating the client."""

    def list_available_services(self, type_name):
        return ["s3"]


def _s3_session() -> botocore.session.Session:
    """A botocore session for the one client a mount needs. Not boto3's: importing boto3 (and
    s3transfer with it) and its session cost ~75 ms more CPU at start-up, for nothing used
    here. Credentials, region and config files are resolved by botocore either way."""
    session = botocore.session.Session()
    session.register_component("data_loader", _S3OnlyLoader(
        extra_search_paths=[p for p in (session.get_config_variable("data_path") or "").split(":") if p]))
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
    return session


def _timestamp(value: str) -> datetime.datetime:
    """A listing's LastModified (ISO 8601) in 0.1 us; botocore's parser (dateutil) took 57 us,
    57 ms of CPU per 1,000-key page. Anything else (a HEAD's HTTP date) goes to botocore's."""
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return botocore.utils.parse_timestamp(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


class _Retry(Exception):
    """Internal: this attempt failed in a way another attempt may fix."""


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    mtime_ns: int
    etag: str


@dataclass
class Listing:
    prefixes: list[str]
    objects: list[ListedObject]


class S3Backend:
    def __init__(self, bucket: str, *, endpoint_url: str | None, region: str | None,
                 max_requests: int, connect_timeout: float, read_timeout: float,
                 max_attempts: int, deadline: float, counters: Counters,
                 buffers: BufferPool | None = None, addressing: str = "auto", etag_md5: bool = True):
        self.bucket = bucket
        self.max_attempts = max_attempts
        self._buffers = buffers or BufferPool()  # what bodies are received into
        self.deadline = deadline
        self.counters = counters
        self._down = False  # the last request ran out of deadline; only a success clears it
        self._etag_md5 = etag_md5  # off: this store's single-part ETags are not MD5s (--no-etag-md5)
        self._slots = threading.BoundedSemaphore(max_requests)
        cfg = botocore.config.Config(
            max_pool_connections=max_requests,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1},  # our own loop retries, including short bodies
            region_name=region or "us-east-1",
            s3={"addressing_style": addressing_style(addressing, endpoint_url)},
        )
        try:
            # Objects the packer writes carry their MD5 only: rclone serve s3 sends a stored
            # CRC32 of the whole object with every ranged GET, which botocore then rejects.
            cfg = cfg.merge(botocore.config.Config(request_checksum_calculation="when_required"))
        except TypeError:
            pass  # botocore < 1.36 adds no checksum to a PUT anyway
        self._client = _s3_session().create_client("s3", endpoint_url=endpoint_url, config=cfg)

    def gauges(self) -> dict[str, int]:
        """1 while S3 is taken as down (one attempt per request until it answers)."""
        return {"s3.down": int(self._down)}

    # --- public operations -----------------------------------------------------

    def check_bucket(self) -> None:
        """Fail fast at mount time with a message naming the actual problem."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.NoCredentialsError:
            raise CredentialsRefused("no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                                     "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)") from None
        except botocore.exceptions.ClientError as e:
            code, status = _code_status(e)
            if status == 404 or code in ("NoSuchBucket", "404"):
                raise BucketMissing(f"bucket {self.bucket!r} does not exist") from None
            if code in _AUTH_CODES or status == 403:
                raise CredentialsRefused(f"access to bucket {self.bucket!r} refused ({code}): "
                                         "check the credentials and the bucket policy") from None
            raise BackendUnavailable(f"bucket {self.bucket!r}: S3 answered {status} {code}") from None
        except (botocore.exceptions.EndpointConnectionError,
                botocore.exceptions.ConnectTimeoutError) as e:
            raise EndpointUnreachable(f"cannot reach S3 endpoint: {e}") from None
        except _TRANSIENT as e:
            raise EndpointUnreachable(f"cannot talk to S3 endpoint: {e}") from None

    def list_dir(self, prefix: str, attempts: int | None = None) -> Listing:
        """One directory level under `prefix` (all pages), each page in at most `attempts`."""
        listing = Listing([], [])
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", lambda _: self._client.list_objects_v2(**kwargs), attempts)
            listing.prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", ()))
            listing.objects.extend(_listed(o) for o in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return listing
            token = page["NextContinuationToken"]

    def list_all(self, prefix: str) -> list[ListedObject]:
        """Every object under `prefix`, at any depth (the packer's one walk of a prefix)."""
        objects, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", lambda _: self._client.list_objects_v2(**kwargs))
            objects.extend(_listed(o) for o in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return objects
            token = page["NextContinuationToken"]

    def get_object(self, key: str) -> tuple[bytes, str]:
        """(body, ETag) of the current version of a small object (a pack index pointer)."""
        def attempt(stop_at: float) -> tuple[bytes, str]:
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            if len(data) != resp["ContentLength"]:
                raise _Retry(f"asked {resp['ContentLength']} bytes of {key!r}, got {len(data)}")
            return data, resp.get("ETag", "").strip('"')

        return self._call("get", attempt)

    def put_object(self, key: str, data: bytes) -> str:
        """Write a whole object (packs, their index, its pointer); returns its ETag. The body's
        MD5 goes along, so S3 refuses a body damaged on the way."""
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        resp = self._call("put", lambda _: self._client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentMD5=md5))
        return resp.get("ETag", "").strip('"')

    def delete_objects(self, keys: list[str]) -> int:
        """Delete these objects, 1,000 a request (`tieredfs pack --gc`); returns how many went.
        A key already gone counts as deleted (S3 says so too)."""
        deleted = 0
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            resp = self._call("delete", lambda _: self._client.delete_objects(Bucket=self.bucket,
                                                                              Delete=batch))
            errors = resp.get("Errors", [])
            if errors:
                raise BackendUnavailable(f"S3 refused to delete {len(errors)} objects, e.g. "
                                         f"{errors[0].get('Key')!r}: {errors[0].get('Code')}")
            deleted += len(batch["Objects"])
        return deleted

    def get_range(self, obj: ObjectVersion, start: int, length: int) -> bytes:
        """Exactly `length` bytes of version `obj.etag` from `start`, or an exception."""
        return self.get_pieces(obj, start, [length])[0] if length > 0 else b""

    def get_pieces(self, obj: ObjectVersion, start: int, lengths: list[int]) -> list[memoryview]:
        """One ranged GET from `start`, received straight into one buffer per piece (e.g. per
        block), so each piece lives and dies on its own: nothing needs copying out of a shared
        body, and a body is not held whole while one of its blocks is still wanted."""
        length = sum(lengths)
        whole = start == 0 and length == obj.size
        # S3 sends a full-object checksum only for a GET of the whole object, and only if asked.
        extra = {"ChecksumMode": "ENABLED"} if whole else {}

        def attempt(stop_at: float) -> list[memoryview]:
            resp = self._client.get_object(Bucket=self.bucket, Key=obj.key, IfMatch=f'"{obj.etag}"',
                                           Range=f"bytes={start}-{start + length - 1}", **extra)
            # Not `with resp["Body"] as body`: that yields the raw urllib3 stream, skipping
            # botocore's Content-Length and x-amz-checksum-* verification.
            body = resp["Body"]
            try:
                pieces, got = self._read_body(body, lengths, stop_at)
            finally:
                body.close()
            got_range = resp.get("ContentRange", "")
            if got != length or (got_range and not got_range.startswith(f"bytes {start}-")):
                self.counters.add("short_bodies")
                raise _Retry(f"asked {length} bytes at {start}, got {got} ({got_range})")
            if whole and self._md5_checkable(obj.etag, resp):
                self._check_md5(obj, pieces)
            return pieces

        pieces = self._call("get", attempt)
        self.counters.add("bytes", length)
        return pieces

    def _read_body(self, body, lengths: list[int], stop_at: float) -> tuple[list[memoryview], int]:
        """The body, unless it trickles in past the deadline: botocore's read timeout is per
        socket read, so a server sending a little at a time would otherwise hold a read forever.

        Read into buffers of the expected lengths: a list of socket reads joined at the end
        held every body twice (bench/: peak RSS of a cold read ~250 MiB, docs/benchmarks.md).
        Returns the buffers and how many bytes arrived in all.
        """
        read, most = _body_reader(body)
        pieces, got = [self._buffers.take(n) for n in lengths], 0
        for view in pieces:
            pos = 0
            while pos < len(view) and (chunk := read(min(most, len(view) - pos))):
                view[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
                if time.monotonic() > stop_at:
                    self.counters.add("slow_bodies")
                    raise _Retry(f"body still arriving at the deadline ({got + pos} bytes)")
            got += pos
            if pos < len(view):
                return pieces, got  # short: the caller retries
        if read(1):
            self.counters.add("short_bodies")  # too long: not the range asked for
            raise _Retry(f"asked {got} bytes, got more")
        return pieces, got

    def _md5_checkable(self, etag: str, resp: dict) -> bool:
        """A single-part object's ETag is its MD5 (32 hex digits; a multipart one ends in
        -N), unless SSE-KMS or SSE-C encrypted it."""
        return (self._etag_md5 and len(etag) == 32 and set(etag.lower()) <= _MD5_HEX
                and resp.get("ServerSideEncryption", "AES256") == "AES256"
                and "SSECustomerAlgorithm" not in resp)

    def _check_md5(self, obj: ObjectVersion, pieces: list) -> None:
        md5 = hashlib.md5()
        for piece in pieces:
            md5.update(piece)
        digest = md5.hexdigest()
        if digest == obj.etag.lower():
            return
        self.counters.add("checksum_mismatches")
        raise _Retry(f"body of {obj.key!r} has MD5 {digest}, its ETag says {obj.etag} (a store "
                     "whose single-part ETags are not MD5s needs --no-etag-md5)")

    # --- the retry loop ------------------------------------------------------------

    def _call(self, kind: str, fn, attempts: int | None = None):
        stop_at = time.monotonic() + self.deadline
        last = "no attempt made"
        unreachable = False  # did the last attempt fail to get any answer from S3?
        for attempt in range(1 if self._down else attempts or self.max_attempts):
            if attempt:
                self.counters.add("retries")
                pause = min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                if time.monotonic() + pause >= stop_at:
                    break
                time.sleep(pause)
            try:
                with self._slots:
                    self.counters.add(f"requests.{kind}")
                    result = fn(stop_at)
                self.counters.add(f"responses.{kind}.ok")
                if self._down:
                    self._down = False
                    log.info("event=s3_recovered action=retrying_normally")
                return result
            except _Retry as e:
                last, unreachable = str(e), False
            except botocore.exceptions.ClientError as e:
                self.counters.add(f"responses.{kind}.{_code_status(e)[1]}")
                last, unreachable = self._classify(e, kind), False
            except botocore.exceptions.NoCredentialsError:
                raise CredentialsRefused("no AWS credentials found") from None
            except (botocore.exceptions.IncompleteReadError, botocore.exceptions.FlexibleChecksumError) as e:
                # S3 answered, with a body botocore found short or damaged.
                self.counters.add("short_bodies" if isinstance(e, botocore.exceptions.IncompleteReadError)
                                  else "checksum_mismatches")
                last, unreachable = str(e), False
            except _TRANSIENT as e:
                self.counters.add("transport_errors")
                self.counters.add(f"responses.{kind}.none")  # no answer: reset, timeout
                last, unreachable = f"{type(e).__name__}: {e}", True
            if time.monotonic() >= stop_at:
                break
        self.counters.add("failures")
        # Only silence is an outage: an S3 that answers 503 wants backoff and retries.
        if unreachable and not self._down and attempts is None:
            self._down = True
            log.warning("event=s3_unavailable error=%r action=one_attempt_per_request_until_s3_answers",
                        last)
        raise BackendUnavailable(f"S3 {kind} failed after retries: {last}")

    def _classify(self, e: "botocore.exceptions.ClientError", kind: str) -> str:
        """Raise for answers another attempt cannot change; return a reason to retry."""
        code, status = _code_status(e)
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            self.counters.add("throttled" if code in ("SlowDown", "Throttling", "429") else "server_errors")
            return f"{status} {code}"
        if code in ("PreconditionFailed", "InvalidRange") or status in (412, 416):
            raise ObjectChanged(f"object changed on S3 since it was opened ({code})")
        if code == "NoSuchBucket":
            raise BucketMissing(f"bucket {self.bucket!r} no longer exists")
        if code in ("NoSuchKey", "404") or status == 404:
            raise ObjectMissing(f"object no longer exists on S3 ({kind})")
        if code in _AUTH_CODES or status == 403:
            raise CredentialsRefused(f"S3 refused the credentials ({code})")
        raise BackendUnavailable(f"S3 {kind} answered {status} {code}")


def _listed(o: dict) -> ListedObject:
    return ListedObject(o["Key"], o["Size"], int(o["LastModified"].timestamp() * 1e9),
                        o.get("ETag", "").strip('"'))


def _code_status(e: "botocore.exceptions.ClientError") -> tuple[str, int]:
    err = e.response.get("Error", {})
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(err.get("Code", status)), int(status or 0)


class S3Tier:
    """The bottom of the chain: never misses; raises TieredError instead."""

    name = "s3"

    def __init__(self, backend: S3Backend):
        self.backend = backend

    def get(self, ref: BlockRef) -> bytes:
        return self.backend.get_range(ref.obj, ref.start, ref.length)

    def get_span(self, refs: list[BlockRef]) -> list[memoryview]:
        """Consecutive blocks in one ranged GET, each received into its own buffer."""
        first = refs[0]
        return self.backend.get_pieces(first.obj, first.start, [r.length for r in refs])

    def put(self, ref: BlockRef, data: bytes) -> None:
        """S3 is the source of truth; blocks are never written back."""

    def put_many(self, items: list[tuple[BlockRef, bytes]]) -> None:
        """Nor several."""

    def stats(self) -> dict[str, int]:
        return self.backend.counters.snapshot()

