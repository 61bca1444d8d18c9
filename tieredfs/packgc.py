"""`tieredfs pack --gc`: delete the index versions and packs that no current index needs.

Kept (docs/packs.md, "Garbage collection"):
- the index version the pointer names, and the `keep` newest versions before it;
- any version superseded less than `grace` seconds ago: a node that loaded it before the
  pointer moved reads its packs until its next look at the pointer (once a listing TTL);
- every pack (and its manifest) that a kept version names;
- every pack no index names that is younger than `grace`: a packer may be running now, or
  an interrupted run left it for the next run to adopt.

Deleting is safe even for a node that still reads a deleted pack: its reads fall back to
the source objects (the pack read fails, `packs.pack_read_failures`), never wrong bytes.
Order: index versions first, then packs, so no remaining version names a deleted pack.
"""

import logging
import time
from dataclasses import dataclass, field

from .errors import ConfigError, ObjectMissing
from .packindex import POINTER, index_name_of, reserved_prefix
from .packwork import downloaded_index, work_dir
from .tiers.s3 import ListedObject, S3Backend

log = logging.getLogger(__name__)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class GcReport:
    versions: list[str] = field(default_factory=list)  # index versions deleted
    packs: list[str] = field(default_factory=list)  # pack objects deleted (manifests go along)
    kept_versions: int = 0
    kept_packs: int = 0
    freed: int = 0  # bytes
    dry_run: bool = False

    def line(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"gc: {verb} {len(self.versions)} index versions and {len(self.packs)} packs "
                f"({self.freed / (1 << 20):.1f} MiB); kept {self.kept_versions} versions, "
                f"{self.kept_packs} packs")


def collect(s3: S3Backend, prefix: str, keep: int, grace: float, dry_run: bool = False,
            now: float | None = None) -> GcReport:
    now = time.time() if now is None else now
    reserved = reserved_prefix(prefix)
    listed = {o.key: o for o in s3.list_all(reserved)}
    report = GcReport(dry_run=dry_run)
    try:
        pointer, _ = s3.get_object(reserved + POINTER)
        current = reserved + index_name_of(pointer, reserved + POINTER)
    except ObjectMissing:
        return report  # nothing indexed yet: every pack may be an unfinished run's
    # Version names begin with their run's UTC time: name order is age order.
    versions = sorted(k for k in listed if k.startswith(reserved + "index/") and k.endswith(".sqlite"))
    kept, gone = _versions_kept(versions, listed, current, keep, grace, now)
    needed = set()
    for key in kept:
        needed |= _packs_named(s3, key)
    packs = [o for k, o in listed.items() if k.startswith(reserved + "packs/") and k.endswith(".pack")]
    dead = [o for o in packs if o.key not in needed and now - o.mtime_ns / 1e9 >= grace]
    report.versions = [o.key for o in gone]
    report.packs = [o.key for o in dead]
    report.kept_versions, report.kept_packs = len(kept), len(packs) - len(dead)
    report.freed = sum(o.size for o in gone + dead)
    if not dry_run:
        s3.delete_objects(report.versions)  # first: no version left names a deleted pack
        manifests = [k[:-len(".pack")] + ".json" for k in report.packs]
        s3.delete_objects(report.packs + [k for k in manifests if k in listed])
        log.info("event=pack_gc prefix=%r versions=%d packs=%d", prefix, len(gone), len(dead))
    return report


def _versions_kept(versions: list[str], listed: dict[str, ListedObject], current: str, keep: int,
                   grace: float, now: float) -> tuple[list[str], list[ListedObject]]:
    """(versions kept, versions to delete): see the module's docstring."""
    kept = [v for v in versions if v > current]  # a packer still running wrote them
    older = [current, *(v for v in reversed(versions) if v < current)]  # newest first
    gone = []
    for rank, key in enumerate(older):
        newer = listed.get(older[rank - 1]) if rank else None
        superseded_at = newer.mtime_ns / 1e9 if newer is not None else now
        if rank <= keep or now - superseded_at < grace:
            kept.append(key)
        else:
            gone.append(listed[key])
    return kept, gone


def _packs_named(s3: S3Backend, key: str) -> set[str]:
    with work_dir("gc") as tmp:
        index = downloaded_index(s3, key, tmp / "index.sqlite")
        try:
            return {p.key for p in index.packs.values()}
        finally:
            index.close()


def parse_grace(text: str) -> float:
    """"90", "30s", "10m", "1h", "2d" -> seconds."""
    t = str(text).strip().lower()
    unit = _UNITS.get(t[-1:], None)
    try:
        value = float(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        raise ConfigError(f"gc-grace: cannot read {text!r} as a duration (e.g. 90s, 10m, 1h)") from None
    if value < 0:
        raise ConfigError("gc-grace must not be negative")
    return value
