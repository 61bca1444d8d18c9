"""Fixtures and helpers shared by the fault scenarios (imported by each test module).

Not a conftest.py: tests/conftest.py is imported as `conftest`, and a second module of
that name here would shadow it.

Each scenario records its numbers with `record(...)` into results/last-run.json;
`python tests/faults/report.py` turns that file into the table of docs/reliability.md.
"""

import json
import os
import threading
import time
from pathlib import Path

import pytest

from conftest import read_file
from test_cache import read_uncached
from proxy import FaultProxy

K = 1024
BS = 64 * K
RESULTS = Path(__file__).parent / "results" / "last-run.json"

# Short bounds so a fault costs seconds, not minutes: a read fails with EIO after
# READ_DEADLINE plus at most one attempt's timeouts.
CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 1.5
READ_DEADLINE = 5.0
FAST = ("--block-size", "64K", "--s3-connect-timeout", str(CONNECT_TIMEOUT),
        "--s3-read-timeout", str(READ_TIMEOUT), "--read-deadline", str(READ_DEADLINE),
        "--s3-max-attempts", "12", "--cache-min-free", "0")
ONE_ATTEMPT = CONNECT_TIMEOUT + READ_TIMEOUT
# The longest a read may take when S3 cannot serve it; margin for 2 shared cores.
EIO_BOUND = READ_DEADLINE + ONE_ATTEMPT + 5.0

_results_lock = threading.Lock()


@pytest.fixture
def proxy(s3server):
    p = FaultProxy(s3server.url).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def via_proxy(mount_factory, proxy):
    """via_proxy(bucket, *extra) -> a Mount whose S3 endpoint is the fault proxy."""

    def factory(bucket: str, *extra: str, **kwargs):
        return mount_factory(bucket, *FAST, *extra, endpoint=proxy.url, **kwargs)

    return factory


def timed(fn, *args):
    """(result or the OSError raised, seconds taken)."""
    start = time.monotonic()
    try:
        result = fn(*args)
    except OSError as e:
        result = e
    return result, time.monotonic() - start


def random_files(put, prefix: str, sizes: list[int]) -> dict[str, bytes]:
    return {f"{prefix}/f{i}.bin": put(f"{prefix}/f{i}.bin", os.urandom(n)) for i, n in enumerate(sizes)}


def s3_stats(mnt) -> dict:
    return {k: v for k, v in mnt.stats().items() if k.startswith("s3.")}


def record(scenario: str, **numbers) -> None:
    """Merge this scenario's numbers into results/last-run.json."""
    with _results_lock:
        RESULTS.parent.mkdir(exist_ok=True)
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        data[scenario] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          **{k: round(v, 3) if isinstance(v, float) else v for k, v in numbers.items()}}
        RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

