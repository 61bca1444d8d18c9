"""The S3 tier's retry loop and the mapping of S3's answers to our error types.

Shared by both HTTP clients (tiers/s3.py's botocore, tiers/s3_crt.py's awscrt), so a request
is retried, bounded and classified the same way whichever client sends it. An attempt ends
in a result, a final TieredError, `Retry` (S3 answered; another attempt may fix it) or
`Unreachable` (no answer: refused, reset, timed out).

Every request goes through one semaphore (bounded concurrency, bounded connection pools) and
one deadline. When a request has used its whole deadline without reaching S3, S3 is taken to
be down: until a request succeeds again, each one makes a single attempt, so readers get EIO
at once instead of one deadline each (the kernel retries a failed read, doubling the wait).
"""

import logging
import random
import threading
import time

from ..errors import BackendUnavailable, BucketMissing, CredentialsRefused, ObjectChanged, ObjectMissing
from ..stats import Counters

log = logging.getLogger(__name__)

_RETRYABLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "429", "TooManyRequests",
}
AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken",
              "InvalidToken"}


class Retry(Exception):
    """Internal: S3 answered, in a way another attempt may fix (5xx, a short body...)."""


class Unreachable(Exception):
    """Internal: no answer from S3 (refused, reset, timed out); another attempt may get one."""


class RetryLoop:
    def __init__(self, bucket: str, *, max_requests: int, max_attempts: int, deadline: float,
                 counters: Counters):
        self.bucket = bucket
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.counters = counters
        self.down = False  # the last request ran out of deadline; only a success clears it
        self._slots = threading.BoundedSemaphore(max_requests)

    def slot_now(self) -> bool:
        """A request slot, if one is free at once and S3 is not taken as down (then every
        request makes the one attempt of call()); free_slot() gives it back."""
        return not self.down and self._slots.acquire(blocking=False)

    def free_slot(self) -> None:
        self._slots.release()

    def call(self, kind: str, fn, attempts: int | None = None, since: float | None = None):
        """fn(stop_at) until it returns, raises a final error, or the attempts or the deadline
        run out (then BackendUnavailable). The deadline runs from `since` (time.monotonic())
        when the request was tried before another way (a begun GET), else from now."""
        stop_at = (time.monotonic() if since is None else since) + self.deadline
        last = "no attempt made"
        unreachable = False  # did the last attempt fail to get any answer from S3?
        for attempt in range(1 if self.down else attempts or self.max_attempts):
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
                if self.down:
                    self.down = False
                    log.info("event=s3_recovered action=retrying_normally")
                return result
            except Retry as e:
                last, unreachable = str(e), False
            except Unreachable as e:
                self.counters.add("transport_errors")
                self.counters.add(f"responses.{kind}.none")  # no answer: reset, timeout
                last, unreachable = str(e), True
            if time.monotonic() >= stop_at:
                break
        self.counters.add("failures")
        # Only silence is an outage: an S3 that answers 503 wants backoff and retries.
        if unreachable and not self.down and attempts is None:
            self.down = True
            log.warning("event=s3_unavailable error=%r action=one_attempt_per_request_until_s3_answers",
                        last)
        raise BackendUnavailable(f"S3 {kind} failed after retries: {last}")

    def answered(self, kind: str, code: str, status: int) -> Retry:
        """An error answer (HTTP status, S3's error code): raise for one another attempt cannot
        change; return the Retry to raise for one it may."""
        self.counters.add(f"responses.{kind}.{status}")
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            self.counters.add("throttled" if code in ("SlowDown", "Throttling", "429") else "server_errors")
            return Retry(f"{status} {code}")
        if code in ("PreconditionFailed", "InvalidRange") or status in (412, 416):
            raise ObjectChanged(f"object changed on S3 since it was opened ({code})")
        if code == "NoSuchBucket":
            raise BucketMissing(f"bucket {self.bucket!r} no longer exists")
        if code in ("NoSuchKey", "404") or status == 404:
            raise ObjectMissing(f"object no longer exists on S3 ({kind})")
        if code in AUTH_CODES or status == 403:
            raise CredentialsRefused(f"S3 refused the credentials ({code})")
        raise BackendUnavailable(f"S3 {kind} answered {status} {code}")
