"""The Prometheus endpoint (--metrics-addr): the daemon's own counters, translated when scraped.

Nothing here runs per read: the hot path adds to stats.py's counters and fixed-bucket
histograms, and this collector turns a snapshot of them into metric families only when
Prometheus asks. prometheus_client serves from its own daemon thread, never the trio one.
docs/metrics.md lists every metric.
"""

import logging
import re
from typing import Callable

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from .errors import MountError
from .stats import Histogram

log = logging.getLogger(__name__)
_NS = "tieredfs"

# Counters and gauges with no label: snapshot key -> (metric name, kind, help).
_PLAIN = {
    "s3.retries": ("s3_retries_total", "counter", "S3 attempts that were retries of a failed one"),
    "s3.failures": ("s3_failures_total", "counter", "S3 requests that failed after all retries"),
    "s3.throttled": ("s3_throttled_total", "counter", "S3 answers asking to slow down (503 SlowDown, 429)"),
    "s3.bytes": ("s3_received_bytes_total", "counter", "Body bytes received from S3"),
    "local.evictions": ("cache_evictions_total", "counter", "Blocks evicted from the local cache"),
    "local.fill_bytes": ("cache_fill_bytes_total", "counter", "Bytes written into the local cache"),
    "local.corrupt": ("cache_corrupt_total", "counter", "Cached blocks that failed their checksum"),
    "local.used_bytes": ("cache_used_bytes", "gauge", "Bytes held by the local cache"),
    "local.blocks": ("cache_blocks", "gauge", "Blocks held by the local cache"),
    "chain.fill_queue_bytes": ("cache_write_queue_bytes", "gauge", "Fetched bytes waiting for the cache disk"),
    "readahead.budget_used_bytes": ("readahead_inflight_bytes", "gauge",
                                    "Prefetched bytes in flight or buffered, not yet read"),
    "readahead.prefetched_bytes": ("readahead_prefetched_bytes_total", "counter", "Bytes prefetched"),
    "readahead.used_bytes": ("readahead_used_bytes_total", "counter", "Prefetched bytes a reader then read"),
    "readahead.wasted_bytes": ("readahead_wasted_bytes_total", "counter", "Prefetched bytes never read"),
    "fs.read_bytes": ("fuse_read_bytes_total", "counter", "Bytes returned to FUSE reads"),
    "fs.open_files": ("open_files", "gauge", "Files open through the mount"),
    "namespace.nodes": ("namespace_nodes", "gauge", "Files and directories the daemon knows"),
}
# Keys with a label taken from the key: pattern -> (metric name, help, label names).
_LABELLED = [
    (re.compile(r"chain\.hits\.(\w+)$"), "tier_hits_total", "Block lookups served by each tier", ("tier",)),
    (re.compile(r"chain\.bytes\.(\w+)$"), "tier_bytes_total", "Bytes served by each tier", ("tier",)),
    (re.compile(r"(\w+)\.misses$"), "tier_misses_total", "Block lookups a tier did not have", ("tier",)),
    (re.compile(r"s3\.responses\.(\w+)\.(\w+)$"), "s3_requests_total",
     "S3 requests by type and outcome (ok, an HTTP status, none: no answer)", ("type", "status")),
    (re.compile(r"fuse\.requests\.(\w+)$"), "fuse_requests_total",
     "FUSE requests the daemon answered, by operation", ("op",)),
]


class Collector:
    """A prometheus_client collector over `snapshot()` (flat name -> int) and the histograms."""

    def __init__(self, snapshot: Callable[[], dict[str, int]],
                 histograms: Callable[[], dict[str, Histogram]], capacity: int):
        self._snapshot = snapshot
        self._histograms = histograms
        self._capacity = capacity

    def collect(self):
        snap = self._snapshot()
        yield from _plain(snap)
        yield from _labelled(snap)
        capacity = GaugeMetricFamily(f"{_NS}_cache_capacity_bytes", "Bytes the local cache may hold")
        capacity.add_metric([], snap.get("local.capacity_bytes", self._capacity))
        yield capacity
        yield _health(snap)
        yield from _latency(self._histograms())


def _plain(snap: dict[str, int]):
    for key, (name, kind, text) in _PLAIN.items():
        if key in snap or kind == "counter":
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            # A counter's family name carries no _total: prometheus_client appends it.
            yield family(f"{_NS}_{name.removesuffix('_total')}", text, value=snap.get(key, 0))


def _labelled(snap: dict[str, int]):
    for pattern, name, text, labels in _LABELLED:
        family = CounterMetricFamily(f"{_NS}_{name.removesuffix('_total')}", text, labels=labels)
        for key, value in snap.items():
            m = pattern.match(key)
            if m and not (name == "tier_misses_total" and key.startswith(("chain.", "s3."))):
                family.add_metric(list(m.groups()), value)
        yield family


def _health(snap: dict[str, int]) -> GaugeMetricFamily:
    """1 if a tier serves, 0 if the daemon routes around it (no usable cache dir, S3 down)."""
    up = GaugeMetricFamily(f"{_NS}_tier_up", "1 while the tier serves reads, 0 while it is bypassed",
                           labels=("tier",))
    up.add_metric(["local"], int("local.used_bytes" in snap))
    for key, value in snap.items():
        if key.endswith(".down"):
            up.add_metric([key.removesuffix(".down")], int(not value))
    return up


def _latency(histograms: dict[str, Histogram]):
    tiers = HistogramMetricFamily(f"{_NS}_tier_get_seconds", "Latency of one tier call (a block "
                                  "or a ranged GET of several)", labels=("tier",))
    fuse = HistogramMetricFamily(f"{_NS}_fuse_read_seconds", "Latency of FUSE read requests")
    for name, h in sorted(histograms.items()):
        counts, total = h.snapshot()
        buckets, running = [], 0
        for bound, n in zip([*map(str, h.bounds), "+Inf"], counts):
            running += n
            buckets.append((bound, running))
        if name == "fuse.read":
            fuse.add_metric([], buckets, total)
        else:
            tiers.add_metric([name], buckets, total)
    yield tiers
    yield fuse


def parse_addr(addr: str) -> tuple[str, int]:
    """'127.0.0.1:9464' -> ('127.0.0.1', 9464); config.py has checked the shape."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    def __init__(self, addr: str, collector: Collector):
        host, port = parse_addr(addr)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise MountError(f"cannot serve metrics on {addr}: {e.strerror}") from None
        log.info("event=metrics_serving addr=%s", addr)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
