"""The S3 tier's checks that no fault scenario reaches: which ETags are MD5s, the
fallback for servers whose ETags are not, and failing fast while S3 is down."""

import socket
import time

import pytest

from tieredfs.blocks import ObjectVersion
from tieredfs.errors import BackendUnavailable
from tieredfs.stats import Counters
from tieredfs.tiers.s3 import S3Backend, _Retry

MD5_OF_ABC = "900150983cd24fb0d6963f7d28e17f72"


def backend(endpoint: str = "http://127.0.0.1:9", deadline: float = 1.0) -> S3Backend:
    return S3Backend("bkt", endpoint_url=endpoint, region=None, max_requests=2, connect_timeout=0.5,
                     read_timeout=0.5, max_attempts=20, deadline=deadline, counters=Counters("s3"))


def test_only_etags_that_can_be_an_md5_are_checked():
    b = backend()
    assert b._md5_checkable(MD5_OF_ABC, {}) and b._md5_checkable(MD5_OF_ABC, {"ServerSideEncryption": "AES256"})
    assert not b._md5_checkable(MD5_OF_ABC[:-2] + "-2", {})  # multipart
    assert not b._md5_checkable(MD5_OF_ABC, {"ServerSideEncryption": "aws:kms"})
    assert not b._md5_checkable(MD5_OF_ABC, {"SSECustomerAlgorithm": "AES256"})


def test_a_mismatch_is_retried_and_the_same_bytes_twice_mean_etags_are_not_md5s():
    b = backend()
    b._check_md5(ObjectVersion("bkt", "k", MD5_OF_ABC, 3), b"abc", set())
    seen: set[str] = set()
    odd = ObjectVersion("bkt", "k", "0" * 32, 3)
    with pytest.raises(_Retry):
        b._check_md5(odd, b"abc", seen)
    b._check_md5(odd, b"abc", seen)  # identical bytes again: accepted
    assert not b._md5_checkable("0" * 32, {})
    assert b.counters.get("checksum_mismatches") == 1


def test_after_one_deadline_is_used_up_each_request_makes_one_attempt():
    with socket.socket() as s:  # a port nothing listens on: every attempt is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = backend(f"http://127.0.0.1:{port}")
    obj = ObjectVersion("bkt", "k", MD5_OF_ABC, 3)
    with pytest.raises(BackendUnavailable):
        b.get_range(obj, 0, 3)
    first = b.counters.get("requests.get")
    assert first > 1
    start = time.monotonic()
    with pytest.raises(BackendUnavailable):
        b.get_range(obj, 0, 3)
    assert b.counters.get("requests.get") == first + 1 and time.monotonic() - start < 0.5
