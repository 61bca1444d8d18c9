"""The start-up bucket check in a forked process (bucket_check.py). Its verdicts through a real
mount are in tests/test_startup.py (missing bucket, refused credentials, bad endpoint, with
no mount left behind); here, the fork itself: each verdict, and a checker that dies."""

import os

import pytest

from tieredfs.bucket_check import BucketCheck, LazyBackend
from tieredfs.errors import BucketMissing, EndpointUnreachable


def _missing():
    raise BucketMissing("bucket 'x' does not exist")


def _unreachable():
    raise EndpointUnreachable("cannot reach S3 endpoint: refused")


def test_each_verdict_comes_back_as_it_was_raised():
    assert BucketCheck.start(lambda: None).result() is True
    with pytest.raises(BucketMissing, match="bucket 'x' does not exist"):
        BucketCheck.start(_missing).result()
    with pytest.raises(EndpointUnreachable, match="refused"):
        BucketCheck.start(_unreachable).result()


def test_a_checker_that_dies_or_crashes_leaves_the_check_to_the_daemon():
    assert BucketCheck.start(lambda: os._exit(3)).result() is False
    assert BucketCheck.start(lambda: 1 / 0).result() is False


def test_the_lazy_backend_makes_its_client_on_the_first_call_only():
    made = []

    class Fake:  # the S3 client cannot exist without S3: this stands in for S3Backend
        def list_dir(self, prefix, attempts=None):
            return (prefix, attempts)

        def gauges(self):
            return {"s3.down": 1}

    backend = LazyBackend(lambda: made.append(1) or Fake(), "b", counters=None)
    listing = backend.list_dir  # taken, as the namespace takes it: nothing made yet
    assert backend.gauges() == {"s3.down": 0} and made == []
    assert listing("p/", attempts=1) == ("p/", 1) and backend.list_dir("q/") == ("q/", None)
    assert made == [1] and backend.gauges() == {"s3.down": 1}
    # Once made, a method taken is the client's own: no proxy call on the hot path.
    assert backend.list_dir.__self__ is backend.real() and "list_dir" in vars(backend)
