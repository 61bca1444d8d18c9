"""`tieredfs stats`: the daemon's counters as a table, as JSON, or as live per-second rates.

Everything comes from the `user.tieredfs.stats` xattr of the mount root, so it works against
any mount, whoever started it.
"""

import json
import os
import time
from pathlib import Path
from typing import Callable, TextIO

from .errors import ConfigError, MountError
from .stats import STATS_XATTR

MiB = 1 << 20
_HEADER_EVERY = 20  # lines, as vmstat repeats its header


def read_stats(mountpoint: Path) -> dict[str, int]:
    try:
        return json.loads(os.getxattr(mountpoint, STATS_XATTR))
    except OSError as e:
        raise MountError(f"{mountpoint} is not a tieredfs mount ({e.strerror})") from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def tiers(snap: dict[str, int]) -> list[str]:
    """Tiers that served anything, in lookup order as far as names tell (s3 last)."""
    seen = {k.split(".", 2)[2] for k in snap if k.startswith("chain.hits.")} | {"local", "s3"}
    order = {"fill_queue": 0, "local": 1, "s3": 9}
    return sorted(seen, key=lambda t: (order.get(t, 5), t))


def table(snap: dict[str, int]) -> str:
    """A summary a person reads in a few seconds, then every counter by component."""
    get = snap.get
    lines = [f"reads        {get('fs.reads', 0):,} ({human_bytes(get('fs.read_bytes', 0))}), "
             f"{get('fs.open_files', 0)} files open"]
    lines.append(f"{'tier':<12} {'hits':>12} {'bytes':>12}")
    for t in tiers(snap):
        lines.append(f"{t:<12} {get(f'chain.hits.{t}', 0):>12,} {human_bytes(get(f'chain.bytes.{t}', 0)):>12}")
    requests = ", ".join(f"{k.split('.')[-1]} {v:,}" for k, v in snap.items() if k.startswith("s3.requests."))
    lines.append(f"S3 requests  {requests or 'none'}; retries {get('s3.retries', 0):,}, "
                 f"failures {get('s3.failures', 0):,}{' (S3 DOWN)' if get('s3.down') else ''}")
    if "local.used_bytes" in snap:
        cap = get("local.capacity_bytes")
        lines.append(f"cache        {human_bytes(get('local.used_bytes', 0))}"
                     f"{' of ' + human_bytes(cap) if cap else ''} in {get('local.blocks', 0):,} blocks, "
                     f"{get('local.evictions', 0):,} evicted")
    else:
        lines.append("cache        not in use (see the daemon's log)")
    if any(k.startswith("shared.") for k in snap):  # tier 2 (docs/shared-tier.md)
        bypassed = " (BYPASSED)" if get("shared.bypassed_reads") or get("shared.bypassed_writes") else ""
        lines.append(f"shared dir   {get('shared.publishes', 0):,} published, {get('shared.corrupt', 0):,} "
                     f"corrupt, {get('shared.lease_waits', 0):,} lease waits, "
                     f"{get('shared.lease_takeovers', 0):,} takeovers{bypassed}")
    lines.append(f"readahead    {human_bytes(get('readahead.budget_used_bytes', 0))} in flight, "
                 f"{human_bytes(get('readahead.prefetched_bytes', 0))} prefetched, "
                 f"{human_bytes(get('readahead.wasted_bytes', 0))} wasted")
    lines.append("")
    width = max(map(len, snap), default=0)
    for key, value in snap.items():
        shown = f"{value:,}" + (f"  ({human_bytes(value)})" if "bytes" in key and value >= 1024 else "")
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def to_json(snap: dict[str, int]) -> str:
    return json.dumps(snap, indent=2, sort_keys=True)


class _Rates:
    """Columns of `stats --watch`: per-second rates between two snapshots."""

    def __init__(self, tier_names: list[str]):
        self.tiers = tier_names
        self.columns: list[tuple[str, Callable[[dict, dict, float], str]]] = [
            ("reads/s", _rate("fs.reads", 1)), ("MiB/s", _rate("fs.read_bytes", MiB, ".1f"))]
        for t in tier_names:
            self.columns.append((f"{t[:6]}/s", _rate(f"chain.hits.{t}", 1)))
            self.columns.append((f"{t[:4]}MiB/s", _rate(f"chain.bytes.{t}", MiB, ".1f")))
        self.columns += [("GET/s", _rate("s3.requests.get", 1)),
                         ("raMiB/s", _rate("readahead.prefetched_bytes", MiB, ".1f")),
                         ("waste/s", _rate("readahead.wasted_bytes", MiB, ".1f")),
                         ("raMiB", lambda old, new, dt: f"{new.get('readahead.budget_used_bytes', 0) / MiB:.1f}")]

    def header(self) -> str:
        return " ".join(f"{name:>11}" for name, _ in self.columns)

    def line(self, old: dict, new: dict, dt: float) -> str:
        return " ".join(f"{fn(old, new, dt):>11}" for _, fn in self.columns)


def _rate(key: str, unit: int, fmt: str = ".0f"):
    return lambda old, new, dt: format((new.get(key, 0) - old.get(key, 0)) / unit / dt, fmt)


def watch_args(value: str, mountpoint: Path | None) -> tuple[float, Path]:
    """(seconds, mount point) from `--watch [SECONDS]`: in `stats --watch MNT`, click hands
    the mount point to --watch as its value."""
    try:
        seconds = float(value)
    except ValueError:
        if mountpoint is not None:
            raise ConfigError(f"--watch {value!r}: SECONDS must be a number") from None
        return 1.0, Path(value)
    if not seconds > 0:
        raise ConfigError(f"--watch {value!r}: SECONDS must be positive")
    if mountpoint is None:
        raise ConfigError("give the MOUNTPOINT of a tieredfs mount")
    return seconds, mountpoint


def watch(mountpoint: Path, interval: float, count: int | None, out: TextIO) -> None:
    """vmstat-style: one line of rates per interval, until Ctrl-C or `count` lines."""
    old, t_old = read_stats(mountpoint), time.monotonic()
    rates, printed = _Rates(tiers(old)), 0
    while count is None or printed < count:
        time.sleep(interval)
        new, t_new = read_stats(mountpoint), time.monotonic()
        changed = tiers(new) != rates.tiers
        if changed:
            rates = _Rates(tiers(new))
        if changed or printed % _HEADER_EVERY == 0:
            print(rates.header(), file=out)
        print(rates.line(old, new, t_new - t_old), file=out, flush=True)
        old, t_old, printed = new, t_new, printed + 1
