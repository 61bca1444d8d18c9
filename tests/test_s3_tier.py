"""The S3 tier's MD5 checks that no fault scenario reaches (which ETags are MD5s, and the
mount's choice for stores whose ETags are not), and how --addressing-style resolves."""

import errno
import hashlib
import os
import subprocess
import sys

import pytest

from tieredfs.blocks import ObjectVersion
from tests.conftest import fill_up
from tieredfs.errors import ConfigError, ObjectMissing
from tieredfs.stats import Counters
from tieredfs.tiers.s3 import S3Backend, addressing_style
from tieredfs.tiers.s3_body import Answer, _check_md5, _md5_checkable, check, check_full_object
from tieredfs.tiers.s3_retry import Retry

MD5_OF_ABC = "900150983cd24fb0d6963f7d28e17f72"


def test_only_etags_that_can_be_an_md5_are_checked():
    assert _md5_checkable(True, MD5_OF_ABC, Answer())
    assert _md5_checkable(True, MD5_OF_ABC, Answer(sse="AES256"))
    assert not _md5_checkable(True, MD5_OF_ABC[:-2] + "-2", Answer())  # multipart
    assert not _md5_checkable(True, MD5_OF_ABC, Answer(sse="aws:kms"))
    assert not _md5_checkable(True, MD5_OF_ABC, Answer(sse_customer=True))


def test_a_mismatch_is_refused_however_often_it_repeats():
    """Whether an ETag is an MD5 is decided from the object, never from the bytes: the same
    wrong bytes twice (a deterministic corruption) are refused twice, not taken as proof."""
    counters = Counters("s3")
    _check_md5(ObjectVersion("bkt", "k", MD5_OF_ABC, 3), [b"ab", b"c"], counters)
    _check_md5(ObjectVersion("bkt", "k", MD5_OF_ABC.upper(), 3), [b"abc"], counters)  # OSS: upper case
    odd = ObjectVersion("bkt", "k", "0" * 32, 3)
    for _ in range(3):
        with pytest.raises(Retry):
            _check_md5(odd, [b"abc"], counters)
    assert _md5_checkable(True, "0" * 32, Answer())
    assert counters.get("checksum_mismatches") == 3


def test_no_etag_md5_is_a_choice_made_at_mount():
    """--no-etag-md5 (Config.etag_md5) reaches the check."""
    assert not _md5_checkable(False, MD5_OF_ABC, Answer())


@pytest.mark.parametrize("style, url, expected", [
    ("auto", None, "virtual"),
    ("auto", "https://s3.eu-west-1.amazonaws.com", "virtual"),
    ("auto", "https://oss-cn-hangzhou.aliyuncs.com", "virtual"),
    ("auto", "https://cos.ap-guangzhou.myqcloud.com", "virtual"),
    ("auto", "http://127.0.0.1:9000", "path"),
    ("auto", "http://[::1]:9000", "path"),
    ("auto", "http://localhost:9000", "path"),
    ("auto", "https://minio.example.org", "path"),
    ("path", "https://oss-cn-hangzhou.aliyuncs.com", "path"),
    ("virtual", "http://objects.test:9000", "virtual"),
])
def test_addressing_style(style, url, expected):
    assert addressing_style(style, url) == expected


@pytest.mark.parametrize("text", ["2026-12-07T04:05:19.123Z", "2026-12-07T04:05:19.123+00:00",
                                  "2026-12-07T04:05:19.123", "Mon, 07 Dec 2026 04:05:19 GMT"])
def test_the_fast_timestamp_parser_agrees_with_botocores(text):
    """Listings' LastModified go through a parser of our own (botocore's is 400x slower);
    every form S3 sends must give botocore's instant (no zone: UTC, as botocore takes it)."""
    from botocore.utils import parse_timestamp

    from tieredfs.tiers.s3 import _timestamp

    assert _timestamp(text).timestamp() == parse_timestamp(text).timestamp()


def test_without_awscrt_auto_is_boto3_and_crt_is_a_clear_error(monkeypatch):
    """awscrt is a dependency, but a mount must not need it: absent, `auto` sends every GET
    through botocore and `crt` is refused at start. Absence is made by hiding our awscrt
    module (importing it raises ImportError, as `import awscrt` would); botocore, which
    imports awscrt itself when it is installed, is left alone."""
    monkeypatch.setitem(sys.modules, "tieredfs.tiers.s3_crt", None)
    kwargs = dict(endpoint_url="http://127.0.0.1:9", region=None, max_requests=1, connect_timeout=0.5,
                  read_timeout=0.5, max_attempts=1, deadline=1.0, counters=Counters("s3"))
    assert S3Backend("bkt", http_client="auto", **kwargs)._crt is None
    with pytest.raises(ConfigError, match="awscrt"):
        S3Backend("bkt", http_client="crt", **kwargs)


@pytest.mark.parametrize("values, named", [({"http_client": "curl"}, "http-client"),
                                           ({"crt_threads": 0}, "crt-threads"), ({"crt_threads": 17}, "crt-threads")])
def test_a_bad_client_choice_is_a_config_error(values, named):
    from tieredfs.config import build_config

    with pytest.raises(ConfigError, match=named):
        build_config("s3://bkt", {}, values)
    assert build_config("s3://bkt", {}, {}).http_client == "auto"


def test_botocore_is_imported_without_awscrt_which_stays_importable():
    """Start-up (issue 19): botocore imports awscrt when it is installed, ~40 ms of CPU before
    a mount can be ready; tiers/s3.py hides it from that import only. A fresh interpreter,
    since this one imported botocore long ago."""
    code = ("import sys, tieredfs.tiers.s3, botocore.compat\n"
            "print('awscrt' in sys.modules, botocore.compat.HAS_CRT)\n"
            "import awscrt.checksums\n"
            "print(awscrt.checksums.crc32c(b'abc'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", str(0x364B3FB7)]


def test_crt_later_makes_the_awscrt_client_when_asked():
    """A mount in auto makes its awscrt client after it is ready (service.py); until then
    GETs go through botocore."""
    kwargs = dict(endpoint_url="http://127.0.0.1:9", region=None, max_requests=1, connect_timeout=0.5,
                  read_timeout=0.5, max_attempts=1, deadline=1.0, counters=Counters("s3"))
    b = S3Backend("bkt", http_client="auto", crt_later=True, **kwargs)
    try:
        assert b._crt is None
        b.start_crt()
        assert b._crt is not None
    finally:
        b.close()
    assert S3Backend("bkt", http_client="boto3", crt_later=True, **kwargs).start_crt() is None


@pytest.mark.parametrize("name, body, value", [
    ("x-amz-checksum-crc32", b"hello world", "DUoRhQ=="),
    ("x-amz-checksum-crc32c", b"hello world", "yZRlqg=="),
    ("x-amz-checksum-crc64nvme", b"hello world", "jSnVw/bqjr4="),
    ("x-amz-checksum-sha256", b"abc", "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="),
])
def test_full_object_checksums_are_verified_whichever_client_got_the_body(name, body, value):
    obj = ObjectVersion("bkt", "k", "e", len(body))
    counters = Counters("s3")
    check_full_object(obj, {name: value}, [body[:3], body[3:]], counters)
    wrong = bytes([body[0] ^ 0x20]) + body[1:]
    with pytest.raises(Retry, match=name):
        check_full_object(obj, {name: value}, [wrong], counters)
    check_full_object(obj, {name: value, "x-amz-checksum-type": "COMPOSITE"}, [wrong], counters)
    assert counters.get("checksum_mismatches") == 1


def test_a_whole_body_is_checked_against_its_md5_or_else_its_full_object_checksum():
    """One check per whole-object body: the ETag's MD5 where the ETag is one, else the
    checksum S3 sent (multipart objects, --no-etag-md5)."""
    body = b"hello world"
    crc32 = {"x-amz-checksum-crc32": "DUoRhQ=="}
    wrong_crc = {"x-amz-checksum-crc32": "AAAAAA=="}
    md5 = hashlib.md5(body).hexdigest()
    single = ObjectVersion("b", "k", md5, len(body))
    multipart = ObjectVersion("b", "k", md5[:30] + "-2", len(body))
    counters = Counters("s3")
    check(single, 0, [body], len(body), Answer(checksums=wrong_crc), True, counters)  # the MD5 decides
    check(multipart, 0, [body], len(body), Answer(checksums=crc32), True, counters)
    with pytest.raises(Retry):
        check(multipart, 0, [body], len(body), Answer(checksums=wrong_crc), True, counters)
    with pytest.raises(Retry):  # --no-etag-md5: the checksum is the check
        check(single, 0, [body], len(body), Answer(checksums=wrong_crc), False, counters)
    assert counters.get("checksum_mismatches") == 2


def test_get_file_streams_an_object_to_disk_and_a_failed_write_is_not_retried(s3, s3server, bucket,
                                                                              tmp_path, tiny_tmpfs):
    """Pack indexes go through files (get_file, put_file), never whole in memory."""
    data = os.urandom(3 * (1 << 20) + 5)  # several of get_file's 1 MiB chunks
    s3.put_object(Bucket=bucket, Key="index.sqlite", Body=data)
    b = S3Backend(bucket, endpoint_url=s3server.url, region=None, max_requests=2, connect_timeout=2,
                  read_timeout=10, max_attempts=3, deadline=30, counters=Counters("s3"))
    try:
        assert b.get_file("index.sqlite", tmp_path / "got") == hashlib.md5(data).hexdigest()
        assert (tmp_path / "got").read_bytes() == data
        assert b.put_file("copy", tmp_path / "got") == hashlib.md5(data).hexdigest()
        assert s3.get_object(Bucket=bucket, Key="copy")["Body"].read() == data
        with pytest.raises(ObjectMissing):
            b.get_file("absent", tmp_path / "absent")
        # A full disk is the disk's error, at once: not a network failure to retry.
        fill_up(tiny_tmpfs, leave=64 << 10)
        s3server.reset_counts()
        with pytest.raises(OSError) as e:
            b.get_file("index.sqlite", tiny_tmpfs / "got")
        assert e.value.errno == errno.ENOSPC and s3server.counts()["GET"] == 1
    finally:
        b.close()
