"""Counters shared by the components of one daemon.

Each component owns a `Counters` with a prefix; `snapshot()` of the registry is what
`tieredfs stats` and the bench read (via the user.tieredfs.stats xattr of the mount root).
"""

import bisect
import threading
from collections import defaultdict

# The extended attributes the daemon answers (fuse_ops.py) and the CLI reads.
STATS_XATTR = "user.tieredfs.stats"  # the mount root: snapshot() as JSON
MOUNT_XATTR = "user.tieredfs.mount"  # the mount root: bucket, prefix, block size (warmup --replay)
ETAG_XATTR = "user.tieredfs.etag"  # a file: the version its reads are served from

# Latency bucket bounds in seconds: from a page-cache hit of tier 1 (~20 us) to an S3 request
# near its deadline. Fixed, so observing is a bisect and two adds, not an allocation.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Counters:
    """Thread-safe monotonically increasing counters plus set-able gauges."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._values: dict[str, int] = defaultdict(int)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._values[name] = value

    def max(self, name: str, value: int) -> None:
        with self._lock:
            if value > self._values[name]:
                self._values[name] = value

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f"{self.prefix}.{k}": v for k, v in self._values.items()}


class Histogram:
    """Fixed-bucket latency histogram; cheap enough for every FUSE read and tier call."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = bounds
        self._lock = threading.Lock()
        self._counts = [0] * (len(bounds) + 1)  # the last one is above every bound
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[int], float]:
        """Per-bucket counts (not cumulative; the last is +Inf only) and the sum of seconds."""
        with self._lock:
            return list(self._counts), self._sum


class Registry:
    def __init__(self):
        self._counters: list[Counters] = []
        self._sources = []
        self._histograms: dict[str, Histogram] = {}
        self._histograms_lock = threading.Lock()

    def histogram(self, name: str) -> Histogram:
        """The histogram called `name` (e.g. "tier.local"), made on first use."""
        with self._histograms_lock:
            h = self._histograms.get(name)
            if h is None:
                h = self._histograms[name] = Histogram()
            return h

    def histograms(self) -> dict[str, Histogram]:
        with self._histograms_lock:
            return dict(self._histograms)

    def add_source(self, snapshot) -> None:
        """A component whose stats() are computed when read (gauges such as bytes used)."""
        self._sources.append(snapshot)

    def counters(self, prefix: str) -> Counters:
        c = Counters(prefix)
        self._counters.append(c)
        return c

    def snapshot(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self._counters:
            out.update(c.snapshot())
        for source in self._sources:
            out.update(source())
        return dict(sorted(out.items()))
