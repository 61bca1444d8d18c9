"""Where a measurement's CPU went: the machine's busy and idle time (/proc/stat) and the CPU
of named processes (/proc/PID/stat), sampled every 10 ms while a row is measured.

On this 2-core machine the S3 server, the reader (fio) and the daemon share the cores, so a
row's speed is bounded either by CPU (the machine had little idle time) or by waiting (it
had much). `ceiling_mib_s` says what the cores would give at the row's CPU per byte had
nothing waited: for a cold read below 0.8x boto3 that tells whether less waiting could get
there at all, or only less CPU per byte could.

Samples, not a before/after pair: starting fio costs ~0.17 s of CPU and ~0.28 s of mostly
idle wall time here, a tenth of a cold GiB's CPU and a third of its idle time. So each fio
run's CPU is taken between the moments fio says its reads began and ended (`between`).
"""

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_MiB = 1 << 20


def _machine() -> tuple[float, float, float]:
    """(busy, idle, steal) seconds of all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / _TICK, (idle + iowait) / _TICK, steal / _TICK


def _process(pid: int) -> float | None:
    """User + system seconds of one process (all its threads), None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuSampler:
    """with CpuSampler(daemon=pid, server=pid) as cpu: ...; then cpu.between(t0, t1) or
    cpu.result (the whole stretch), in seconds; t0, t1 are time.time() values."""

    def __init__(self, interval: float = 0.01, **pids: int | None):
        self.interval = interval
        self.pids = {**_watched, **{name: pid for name, pid in pids.items() if pid}}
        self._samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        busy, idle, steal = _machine()
        counters = {"busy_s": busy, "idle_s": idle, "steal_s": steal}
        for name, pid in self.pids.items():
            seconds = _process(pid)
            if seconds is not None:
                counters[f"{name}_s"] = seconds
        self._samples.append((time.time(), counters))

    @property
    def result(self) -> dict[str, float]:
        return self.between(self._samples[0][0], self._samples[-1][0])

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """Each counter's growth from t0 to t1, interpolated between the samples around them
        (clamped to the sampled stretch)."""
        start, end = self._at(t0), self._at(t1)
        return {k: end[k] - start[k] for k in end if k in start}

    def _at(self, t: float) -> dict[str, float]:
        samples = self._samples
        if t <= samples[0][0]:
            return samples[0][1]
        for (ta, a), (tb, b) in zip(samples, samples[1:]):
            if t <= tb:
                w = (t - ta) / (tb - ta) if tb > ta else 1.0
                return {k: a[k] + (b[k] - a[k]) * w for k in b if k in a}
        return samples[-1][1]


_watched: dict[str, int] = {}


@contextmanager
def watching(**pids: int | None):
    """Within it, every CpuSampler() also follows these processes (the daemon of the row
    being measured, say), so a fio run started deep in a workload needs no PIDs passed."""
    added = {name: pid for name, pid in pids.items() if pid and name not in _watched}
    _watched.update(added)
    try:
        yield
    finally:
        for name in added:
            del _watched[name]


def watched() -> dict[str, int]:
    return dict(_watched)


def ceiling_mib_s(cpu: dict, nbytes: int) -> float | None:
    """MiB/s that all the cores would give at this CPU per byte, had nothing waited."""
    busy = cpu.get("busy_s", 0)
    return (os.cpu_count() or 1) * nbytes / _MiB / busy if busy > 0 and nbytes else None


def per_gib(cpu: dict, nbytes: int) -> dict[str, float]:
    """The seconds of `cpu` per GiB moved, and the share of the cores left idle."""
    return per_unit(cpu, nbytes / (1 << 30))


def per_unit(cpu: dict, units: float) -> dict[str, float]:
    """The seconds of `cpu` per unit of work (`units` of them done), and the idle share."""
    scale = 1 / units
    out = {k.removesuffix("_s"): v * scale for k, v in cpu.items() if k.endswith("_s")}
    total = cpu.get("busy_s", 0) + cpu.get("idle_s", 0)
    out["idle_share"] = cpu.get("idle_s", 0) / total if total else 0.0
    return out
