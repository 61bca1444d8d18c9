"""Counters shared by the components of one daemon.

Each component owns a `Counters` with a prefix; `snapshot()` of the registry is what
`tieredfs stats` and the bench read (via the user.tieredfs.stats xattr of the mount root).
"""

import threading
from collections import defaultdict


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


class Registry:
    def __init__(self):
        self._counters: list[Counters] = []
        self._sources = []

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
