"""Tier 3: S3 through botocore, boto3's core (the only module that imports boto3/botocore).

Listings, HEAD, PUTs, credentials and every GET that awscrt does not serve go through one
botocore client. Whichever client sends a request, it is retried, bounded and classified by
one RetryLoop (tiers/s3_retry.py), and a GET's body passes the same checks (tiers/s3_body.py).
Which client serves a GET is --http-client: `auto` gives awscrt (tiers/s3_crt.py) the GETs it
was measured to serve with less CPU, when it is installed (docs/performance-notes.md).
"""

import base64
import datetime
import hashlib
import ipaddress
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator
from urllib.parse import urlsplit

# botocore.compat imports awscrt whenever it is installed, for what a mount does not use
# (SigV4a signers) or checks itself (crc32c and crc64nvme checksums, s3_body.py). Loading
# awscrt's native library was ~40 ms of CPU on the way to a mount being ready (issue 19):
# hidden from botocore's import here, it is loaded after the mount is ready, by our own
# awscrt client (S3Backend.start_crt) or the first checksum that needs it.
_HIDE_AWSCRT = "awscrt" not in sys.modules
if _HIDE_AWSCRT:
    sys.modules["awscrt"] = None  # type: ignore[assignment]  # import awscrt: ImportError
try:
    import botocore.compat
finally:
    if _HIDE_AWSCRT:
        del sys.modules["awscrt"]
import botocore.config  # noqa: E402 - after botocore.compat, above
import botocore.exceptions  # noqa: E402
import botocore.loaders  # noqa: E402
import botocore.response  # noqa: E402
import botocore.session  # noqa: E402
import botocore.utils  # noqa: E402
import urllib3.exceptions  # noqa: E402

from . import s3_listing  # noqa: E402
from ..blocks import BlockRef, ObjectVersion  # noqa: E402
from ..errors import (BackendUnavailable, BucketMissing, ConfigError, CredentialsRefused,  # noqa: E402
                      EndpointUnreachable, TieredError)
from ..memory import BufferPool  # noqa: E402
from ..stats import Counters  # noqa: E402
from .s3_body import CRT_ONLY, Answer, check, read_pieces  # noqa: E402
from .s3_retry import AUTH_CODES, Retry, RetryLoop, Unreachable  # noqa: E402

if TYPE_CHECKING:
    from .s3_crt import Begun

log = logging.getLogger(__name__)

# A body is checked against the deadline after every socket read (at most _BODY_PIECE bytes),
# or, for a body that can only be read in fixed amounts, every _BODY_CHUNK bytes.
_BODY_PIECE = 1024 * 1024
_BODY_CHUNK = 16 * 1024
# The largest GET awscrt serves under --http-client auto (_crt_serves).
CRT_MAX_BYTES = 256 * 1024
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


@dataclass(frozen=True, slots=True)
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
                 buffers: BufferPool | None = None, addressing: str = "auto", etag_md5: bool = True,
                 http_client: str = "boto3", crt_threads: int = 1, crt_later: bool = False):
        self.bucket = bucket
        self.read_timeout = read_timeout
        self._buffers = buffers or BufferPool()  # what bodies are received into
        self.counters = counters
        self._etag_md5 = etag_md5  # off: this store's single-part ETags are not MD5s (--no-etag-md5)
        self._loop = RetryLoop(bucket, max_requests=max_requests, max_attempts=max_attempts,
                               deadline=deadline, counters=counters)
        style = addressing_style(addressing, endpoint_url)
        cfg = botocore.config.Config(
            max_pool_connections=max_requests,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1},  # our own loop retries, including short bodies
            region_name=region or "us-east-1",
            s3={"addressing_style": style},
        )
        try:
            # Objects the packer writes carry their MD5 only: rclone serve s3 sends a stored
            # CRC32 of the whole object with every ranged GET, which botocore then rejects.
            cfg = cfg.merge(botocore.config.Config(request_checksum_calculation="when_required"))
        except TypeError:
            pass  # botocore < 1.36 adds no checksum to a PUT anyway
        self._session = _s3_session()
        self._client = self._session.create_client("s3", endpoint_url=endpoint_url, config=cfg)
        self._crt = None
        self._crt_all = http_client == "crt"  # else auto: crt for the GETs it wins (_crt_serves)
        self._crt_settings = None if http_client == "boto3" else dict(
            endpoint_url=self._client.meta.endpoint_url, region=self._client.meta.region_name,
            style=style, credentials=self._credentials, connect_timeout=connect_timeout,
            read_timeout=read_timeout, threads=crt_threads, loop=self._loop,
            ca_bundle=self._session.get_config_variable("ca_bundle"))
        if self._crt_all or not crt_later:
            self.start_crt()

    def start_crt(self) -> None:
        """Make the awscrt client for the GETs it serves (--http-client auto or crt). A mount
        in auto makes it once it is ready (crt_later): loading awscrt is ~40 ms of CPU that
        start-up need not wait for; until then every GET goes through botocore."""
        if self._crt is not None or self._crt_settings is None:
            return
        try:
            from .s3_crt import CrtGets  # the only importer of awscrt's client
        except ImportError:
            if self._crt_all:
                raise ConfigError("--http-client crt needs awscrt (pip install awscrt); "
                                  "auto falls back to boto3 without it") from None
            self._crt_settings = None
            return
        self._crt = CrtGets(self.bucket, **self._crt_settings)

    @property
    def deadline(self) -> float:
        return self._loop.deadline

    @property
    def max_attempts(self) -> int:
        return self._loop.max_attempts

    def gauges(self) -> dict[str, int]:
        """1 while S3 is taken as down (one attempt per request until it answers)."""
        return {"s3.down": int(self._loop.down)}

    def close(self) -> None:
        """Let go of awscrt's connections and event-loop threads (unmount)."""
        if self._crt is not None:
            self._crt.close()

    def _credentials(self):
        """botocore's current credentials (refreshed by botocore when temporary), for awscrt;
        a failed refresh is mapped as any botocore error of a GET."""
        creds = self._session.get_credentials()
        if creds is None:
            raise CredentialsRefused("no AWS credentials found")
        return self._boto("get", creds.get_frozen_credentials)

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
            if code in AUTH_CODES or status == 403:
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
        s3_listing.install(self._client, ListedObject)  # pages parsed leanly (once per client)
        listing = Listing([], [])
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", lambda _: self._client.list_objects_v2(**kwargs), attempts)
            prefixes, objects = s3_listing.entries(page, _listed)
            listing.prefixes.extend(prefixes)
            listing.objects.extend(objects)
            if not page.get("IsTruncated"):
                return listing
            token = page["NextContinuationToken"]

    def list_all(self, prefix: str) -> list[ListedObject]:
        """Every object under `prefix`, at any depth (packgc's walk of the reserved prefix)."""
        return self.list_tree(prefix, None)

    def list_tree(self, prefix: str, max_keys: int | None) -> list[ListedObject] | None:
        """Every object under `prefix`, at any depth, if there are at most `max_keys` of them
        (None: however many); else None, after listing about `max_keys` of them."""
        objects, token = [], None
        while True:
            page, token = self._list_page(prefix, token)
            objects.extend(page)
            if not token:
                return objects
            if max_keys is not None and len(objects) >= max_keys:
                return None

    def list_pages(self, prefix: str) -> Iterator[list[ListedObject]]:
        """Every object under `prefix`, at any depth, a page (up to 1,000) at a time: the
        packer's walk, which keeps no more than a page of the listing in memory."""
        token = None
        while True:
            page, token = self._list_page(prefix, token)
            yield page
            if not token:
                return

    def _list_page(self, prefix: str, token: str | None) -> tuple[list[ListedObject], str | None]:
        """One page of a recursive listing, and the token of the next (None: the last page)."""
        s3_listing.install(self._client, ListedObject)
        kwargs = {"Bucket": self.bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = self._call("list", lambda _: self._client.list_objects_v2(**kwargs))
        return (s3_listing.entries(page, _listed)[1],
                page["NextContinuationToken"] if page.get("IsTruncated") else None)

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
                raise Retry(f"asked {resp['ContentLength']} bytes of {key!r}, got {len(data)}")
            return data, resp.get("ETag", "").strip('"')

        return self._call("get", attempt)

    def get_file(self, key: str, path: Path) -> str:
        """The current version of an object into a local file, a MiB at a time (a pack index
        of millions of entries is not held in memory); returns its ETag. A failed write of
        the file raises its OSError, not retried."""
        def attempt(stop_at: float) -> str:
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            body, got = resp["Body"], 0
            try:
                with path.open("wb") as f:
                    for chunk in body.iter_chunks(1 << 20):
                        try:
                            f.write(chunk)
                        except OSError as e:
                            raise _LocalWriteFailed(e) from None
                        got += len(chunk)
            finally:
                body.close()
            if got != resp["ContentLength"]:
                raise Retry(f"asked {resp['ContentLength']} bytes of {key!r}, got {got}")
            return resp.get("ETag", "").strip('"')

        try:
            return self._call("get", attempt)
        except _LocalWriteFailed as e:
            raise e.args[0] from None

    def put_object(self, key: str, data: bytes | bytearray) -> str:
        """Write a whole object (packs, their index, its pointer); returns its ETag. The body's
        MD5 goes along, so S3 refuses a body damaged on the way."""
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        resp = self._call("put", lambda _: self._client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentMD5=md5))
        return resp.get("ETag", "").strip('"')

    def put_file(self, key: str, path: Path) -> str:
        """put_object of a local file, read as it is sent (a pack index of millions of
        entries is not held in memory, nor copied by botocore)."""
        with path.open("rb") as f:
            md5 = base64.b64encode(hashlib.file_digest(f, "md5").digest()).decode()

        def attempt(_):
            with path.open("rb") as body:
                return self._client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentMD5=md5)
        return self._call("put", attempt).get("ETag", "").strip('"')

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

    def get_range(self, obj: ObjectVersion, start: int, length: int, since: float | None = None) -> bytes:
        """Exactly `length` bytes of version `obj.etag` from `start`, or an exception."""
        return self.get_pieces(obj, start, [length], since)[0] if length > 0 else b""

    def get_pieces(self, obj: ObjectVersion, start: int, lengths: list[int],
                   since: float | None = None) -> list[memoryview]:
        """One ranged GET from `start`, received straight into one buffer per piece (e.g. per
        block), so each piece lives and dies on its own: nothing needs copying out of a shared
        body, and a body is not held whole while one of its blocks is still wanted."""
        length = sum(lengths)
        whole = start == 0 and length == obj.size
        get = self._crt.get if self._crt is not None and (self._crt_all or _crt_serves(length)) \
            else self._boto_get

        def attempt(stop_at: float) -> list[memoryview]:
            pieces = [self._buffers.take(n) for n in lengths]
            got, answer = get(obj, start, pieces, whole, stop_at)
            check(obj, start, pieces, got, answer, self._etag_md5, self.counters)
            return pieces

        pieces = self._loop.call("get", attempt, since=since)
        self.counters.add("bytes", length)
        return pieces

    def begin_get(self, obj: ObjectVersion, start: int, length: int) -> "Begun | None":
        """A small GET's first attempt, started from the trio thread without waiting for
        anything (issue 19): no worker thread sits on it. None when it cannot start so (not
        an awscrt GET, S3 down, no free slot or kept-alive connection): use get_range."""
        if self._crt is None or not (self._crt_all or _crt_serves(length)) or not self._loop.slot_now():
            return None
        begun = self._crt.begin(obj, start, [self._buffers.take(length, wait=False)],
                                start == 0 and length == obj.size)
        if begun is None:
            self._loop.free_slot()
            return None
        self.counters.add("requests.get")
        return begun

    def end_get(self, begun: "Begun") -> memoryview | None:
        """The begun GET's bytes once its future is done, checked as every GET's are; None if
        anything went wrong: the caller then makes it with get_range, retries and all."""
        try:
            got, answer = self._crt.end(begun)
            check(begun.obj, begun.start, begun.pieces, got, answer, self._etag_md5, self.counters)
        except (Retry, Unreachable, TieredError) as e:
            self.counters.add("begun_gets_failed")
            log.debug("event=begun_get_failed key=%r error=%r action=retrying_in_a_thread", begun.obj.key, str(e))
            return None
        finally:
            self._loop.free_slot()
        self.counters.add("responses.get.ok")
        self.counters.add("bytes", len(begun.pieces[0]))
        return begun.pieces[0]

    def abandon_get(self, begun: "Begun") -> None:
        """A begun GET that took too long or whose reader went away."""
        self.counters.add("begun_gets_abandoned")
        self._crt.abandon(begun)
        self._loop.free_slot()

    def _boto_get(self, obj: ObjectVersion, start: int, pieces: list[memoryview], whole: bool,
                  stop_at: float) -> tuple[int, Answer]:
        # S3 sends a full-object checksum only for a GET of the whole object, and only if asked.
        extra = {"ChecksumMode": "ENABLED"} if whole else {}
        length = sum(len(p) for p in pieces)
        resp = self._boto("get", lambda: self._client.get_object(
            Bucket=self.bucket, Key=obj.key, IfMatch=f'"{obj.etag}"',
            Range=f"bytes={start}-{start + length - 1}", **extra))
        # Not `with resp["Body"] as body`: that yields the raw urllib3 stream, skipping
        # botocore's Content-Length and x-amz-checksum-* verification.
        body = resp["Body"]
        try:
            got = self._boto("get", lambda: read_pieces(*_body_reader(body), pieces, stop_at, self.counters))
        finally:
            body.close()
        unverified = None
        if whole and not botocore.compat.HAS_CRT:  # botocore skipped these (check() does them)
            headers = resp["ResponseMetadata"]["HTTPHeaders"]
            unverified = {k: v for k, v in headers.items() if k in CRT_ONLY or k == "x-amz-checksum-type"}
        return got, Answer(resp.get("ContentRange", ""), resp.get("ServerSideEncryption", "AES256"),
                           "SSECustomerAlgorithm" in resp, checksums=unverified)

    # --- botocore's errors, as the retry loop takes them ------------------------------

    def _call(self, kind: str, fn, attempts: int | None = None):
        return self._loop.call(kind, lambda stop_at: self._boto(kind, lambda: fn(stop_at)), attempts)

    def _boto(self, kind: str, fn):
        try:
            return fn()
        except botocore.exceptions.ClientError as e:
            raise self._loop.answered(kind, *_code_status(e)) from None
        except botocore.exceptions.NoCredentialsError:
            raise CredentialsRefused("no AWS credentials found") from None
        except (botocore.exceptions.IncompleteReadError, botocore.exceptions.FlexibleChecksumError) as e:
            # S3 answered, with a body botocore found short or damaged.
            self.counters.add("short_bodies" if isinstance(e, botocore.exceptions.IncompleteReadError)
                              else "checksum_mismatches")
            raise Retry(str(e)) from None
        except _TRANSIENT as e:
            raise Unreachable(f"{type(e).__name__}: {e}") from None


class _LocalWriteFailed(Exception):
    """A local file's write failed during a GET (get_file): not the network's, never retried."""


def _crt_serves(length: int) -> bool:
    """Under --http-client auto, awscrt serves GETs of up to CRT_MAX_BYTES: there it was
    measured to cost less CPU per GET than botocore (bench/http_clients.py)."""
    return length <= CRT_MAX_BYTES


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

    def get(self, ref: BlockRef, since: float | None = None) -> bytes:
        """`since`: when a begun GET of this block was started (its deadline runs from then)."""
        return self.backend.get_range(ref.obj, ref.start, ref.length, since)

    def begin(self, ref: BlockRef) -> "Begun | None":
        """The block's GET started without waiting (S3Backend.begin_get), or None."""
        return self.backend.begin_get(ref.obj, ref.start, ref.length)

    def end(self, begun: "Begun") -> memoryview | None:
        return self.backend.end_get(begun)

    def abandon(self, begun: "Begun") -> None:
        self.backend.abandon_get(begun)

    @property
    def begun_timeout(self) -> float:
        """How long a begun GET may take before the waiting path takes over."""
        return self.backend.read_timeout

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

