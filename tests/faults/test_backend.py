"""The S3 tier's fail-fast mode against the proxy, without a mount: silence trips it,
an S3 that answers (even 503) does not, and the first success ends it."""

import pytest

from kit import proxy
from tieredfs.blocks import ObjectVersion
from tieredfs.errors import BackendUnavailable
from tieredfs.stats import Counters
from tieredfs.tiers.s3 import S3Backend

pytestmark = pytest.mark.faults


def test_only_silence_makes_requests_fail_fast_and_a_success_ends_it(s3, bucket, proxy):
    etag = s3.put_object(Bucket=bucket, Key="k", Body=b"abc")["ETag"].strip('"')
    obj = ObjectVersion(bucket, "k", etag, 3)
    b = S3Backend(bucket, endpoint_url=proxy.url, region=None, max_requests=2, connect_timeout=0.5,
                  read_timeout=0.5, max_attempts=20, deadline=1.0, counters=Counters("s3"))
    gets = lambda: b.counters.get("requests.get")

    def attempts_of_one_failed_get() -> int:
        before = gets()
        with pytest.raises(BackendUnavailable):
            b.get_range(obj, 0, 3)
        return gets() - before

    proxy.add("error", status=503, code="SlowDown")
    assert attempts_of_one_failed_get() > 1
    assert attempts_of_one_failed_get() > 1  # S3 answers: keep backing off and retrying
    proxy.clear()
    proxy.add("outage")
    assert attempts_of_one_failed_get() > 1
    assert attempts_of_one_failed_get() == 1  # silence used up a deadline: fail fast
    proxy.clear()
    assert b.get_range(obj, 0, 3) == b"abc"
    proxy.add("outage")
    assert attempts_of_one_failed_get() > 1  # that success restored the retries
