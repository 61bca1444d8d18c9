"""`tieredfs pack s3://BUCKET/PREFIX`: small objects concatenated into packs, and an index.

The source objects are never touched: packing is an acceleration, and every other S3 tool
sees the bucket as it was. The order of writes makes a run safe to interrupt and to run while
nodes mount the prefix (docs/packs.md):

1. each pack object, then its manifest (the entries it holds);
2. the new index version, an object of its own;
3. last, the pointer naming that version.

Nothing is overwritten but the pointer, so a node holding the last index keeps reading. An
interrupted run leaves packs and manifests that no index names; the next run adopts the
manifests' entries whose sources are unchanged, and packs the rest.
"""

import json
import logging
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from .blocks import ObjectVersion
from .errors import ObjectChanged, ObjectMissing, PackIndexUnusable
from .packindex import (FORMAT, POINTER, RESERVED, Entry, Other, Pack, PackIndex, checksum,
                        index_name_of, pointer_bytes, reserved_prefix, write_index)
from .tiers.s3 import ListedObject, S3Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackOptions:
    max_file_size: int = 1 << 20
    pack_size: int = 64 << 20
    parallel: int = 16
    dry_run: bool = False
    progress: bool = True  # a bar on a terminal


@dataclass
class Summary:
    files: int = 0  # packed by this run
    packs: int = 0  # written by this run
    bytes: int = 0
    kept: int = 0  # entries of the last index still current
    adopted: int = 0  # entries of packs an interrupted run wrote
    dropped: int = 0  # entries whose source changed or went: packed again or left out
    skipped: int = 0  # sources that changed or went while this run read them
    index: str = ""  # the index version now current ("" if unchanged)
    seconds: float = 0.0
    dry_run: bool = False

    def line(self) -> str:
        verb = "would pack" if self.dry_run else "packed"
        mib = self.bytes / (1 << 20)
        rate = self.files / self.seconds if self.seconds else 0.0
        text = (f"{verb} {self.files} files ({mib:.1f} MiB) into {self.packs} packs in "
                f"{self.seconds:.1f}s ({rate:.0f} files/s); kept {self.kept}, adopted {self.adopted}, "
                f"dropped {self.dropped} stale, skipped {self.skipped} changed while reading")
        return text + (f"; index {self.index}" if self.index else "; index unchanged")


def walk_order(key: str) -> tuple:
    """A directory's files, then its subdirectories one by one, each in name order: the
    order in which a walk (os.walk, find, a data loader's listing) reads them."""
    parts = key.split("/")
    return tuple(parts[:-1]), parts[-1]


@dataclass
class _State:
    """What the prefix holds before this run: sources, and entries that still hold."""

    sources: dict[str, ListedObject]  # path relative to the prefix -> object
    pack_objects: dict[str, ListedObject]  # key -> pack or manifest object
    entries: dict[str, Entry] = field(default_factory=dict)
    indexed_packs: set[str] = field(default_factory=set)
    dropped: int = 0
    others: set[Other] | None = None  # the last index's unpacked objects (None: no index)


class Packer:
    def __init__(self, backend: S3Backend, prefix: str, options: PackOptions):
        self.s3 = backend
        self.prefix = prefix
        self.reserved = reserved_prefix(prefix)
        self.o = options
        # Names sort in the order runs began (packgc.py relies on it), to the microsecond:
        # two runs within one second once sorted by their random part instead.
        now = time.time_ns()
        self.run_id = (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
                       + f"{now // 1000 % 10**6:06d}-{uuid.uuid4().hex[:8]}")

    def run(self) -> Summary:
        t0 = time.monotonic()
        summary = Summary(dry_run=self.o.dry_run)
        state = self._state()
        summary.kept = len(state.entries)
        summary.dropped = state.dropped
        if not self.o.dry_run:
            summary.adopted = self._adopt(state)
        todo = sorted((o for path, o in state.sources.items()
                       if path not in state.entries and 0 < o.size <= self.o.max_file_size),
                      key=lambda o: walk_order(o.key))
        groups = self._groups(todo)
        if self.o.dry_run:
            summary.files, summary.packs = len(todo), len(groups)
            summary.bytes = sum(o.size for o in todo)
        else:
            self._pack_all(groups, state, summary)
            others = self._others(state)
            if (summary.files or summary.adopted or summary.dropped
                    or (state.others is not None and set(others) != state.others)):
                summary.index = self._publish(state, others)
        summary.seconds = time.monotonic() - t0
        return summary

    # --- what is there ---------------------------------------------------------------------

    def _state(self) -> _State:
        listed = self.s3.list_all(self.prefix)
        n = len(self.prefix)
        # Not the packs of this prefix, nor those of a packed prefix below it.
        state = _State({o.key[n:]: o for o in listed if f"/{RESERVED}/" not in f"/{o.key[n:]}"},
                       {o.key: o for o in listed if o.key.startswith(self.reserved + "packs/")})
        index = self.current_index(self.s3, self.prefix, Path(tempfile.gettempdir()))
        if index is None:
            return state
        try:
            for e in index.entries():
                if self._still_holds(state, e):
                    state.entries[e.path] = e
                else:
                    state.dropped += 1
            state.indexed_packs = {p.key for p in index.packs.values()}
            state.others = set(index.others())  # none in an index of before they were listed
        finally:
            index.close()
            index.path.unlink(missing_ok=True)
        return state

    @staticmethod
    def current_index(s3: S3Backend, prefix: str, workdir: Path) -> PackIndex | None:
        """The index the pointer names, downloaded into `workdir`; None if none yet."""
        where = reserved_prefix(prefix) + POINTER
        try:
            pointer, _ = s3.get_object(where)
        except ObjectMissing:
            return None
        data, _ = s3.get_object(reserved_prefix(prefix) + index_name_of(pointer, where))
        local = Path(tempfile.mkstemp(suffix=".sqlite", dir=workdir)[1])
        local.write_bytes(data)
        try:
            return PackIndex(local)
        except PackIndexUnusable:
            local.unlink(missing_ok=True)
            raise

    @staticmethod
    def _still_holds(state: _State, e: Entry) -> bool:
        src, pack = state.sources.get(e.path), state.pack_objects.get(e.pack.key)
        return (src is not None and src.etag == e.etag and src.size == e.size
                and pack is not None and pack.etag == e.pack.etag)

    def _adopt(self, state: _State) -> int:
        """Entries of packs that an interrupted run wrote (with their manifest) but never indexed."""
        adopted = 0
        for key, obj in sorted(state.pack_objects.items()):
            if not key.endswith(".json"):
                continue
            pack_key = key[:-len(".json")] + ".pack"
            pack_obj = state.pack_objects.get(pack_key)
            if pack_key in state.indexed_packs or pack_obj is None:
                continue
            data, _ = self.s3.get_object(key)
            try:
                doc = json.loads(data)
                rows = doc["entries"] if doc.get("format") == FORMAT else []
            except (ValueError, KeyError, AttributeError):
                log.warning("event=pack_manifest_unreadable key=%r action=ignored", key)
                continue
            pack = Pack(pack_key, pack_obj.etag, pack_obj.size)
            for path, etag, size, offset, xxh3 in rows:
                e = Entry(path, etag, size, pack, offset, xxh3)
                if path not in state.entries and self._still_holds(state, e):
                    state.entries[path] = e
                    adopted += 1
        return adopted

    # --- writing packs -----------------------------------------------------------------------

    def _groups(self, todo: list[ListedObject]) -> list[list[ListedObject]]:
        groups, size = [], self.o.pack_size
        for o in todo:
            if not groups or size + o.size > self.o.pack_size:
                groups.append([])
                size = 0
            groups[-1].append(o)
            size += o.size
        return groups

    def _pack_all(self, groups: list[list[ListedObject]], state: _State, summary: Summary) -> None:
        total = sum(o.size for g in groups for o in g)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="packing",
                  disable=None if self.o.progress else True) as bar, \
                ThreadPoolExecutor(self.o.parallel) as pool:
            for n, group in enumerate(groups):
                entries = self._write_pack(n, group, pool, bar)
                for e in entries:
                    state.entries[e.path] = e
                summary.files += len(entries)
                summary.bytes += sum(e.size for e in entries)
                summary.skipped += len(group) - len(entries)
                summary.packs += bool(entries)
                bar.set_postfix(files=summary.files, packs=summary.packs, refresh=False)

    def _write_pack(self, n: int, group: list[ListedObject], pool: ThreadPoolExecutor, bar) -> list[Entry]:
        def fetch(o: ListedObject) -> bytes | None:
            try:
                data = self.s3.get_range(ObjectVersion(self.s3.bucket, o.key, o.etag, o.size), 0, o.size)
            except (ObjectChanged, ObjectMissing):
                return None  # changed since the listing: the next run packs the new version
            bar.update(o.size)
            return data

        body, rows = bytearray(), []
        for o, data in zip(group, pool.map(fetch, group)):
            if data is not None:
                rows.append((o.key[len(self.prefix):], o.etag, o.size, len(body), checksum(data)))
                body += data
        if not rows:
            return []
        key = f"{self.reserved}packs/{self.run_id}-{n:05d}"
        etag = self.s3.put_object(key + ".pack", bytes(body))
        # After the pack: a manifest names only a pack that exists.
        self.s3.put_object(key + ".json", json.dumps({"format": FORMAT, "entries": rows}).encode())
        pack = Pack(key + ".pack", etag, len(body))
        return [Entry(*row[:3], pack, *row[3:]) for row in rows]

    @staticmethod
    def _others(state: _State) -> list[Other]:
        """The prefix's objects not packed: the index lists them too (--listing-from-index)."""
        return [Other(path, o.etag, o.size, o.mtime_ns) for path, o in state.sources.items()
                if path not in state.entries]

    def _publish(self, state: _State, others: list[Other]) -> str:
        """The index version, then the pointer naming it (last: the only overwrite)."""
        name = f"index/{self.run_id}.sqlite"
        # Each entry with its source's Last-Modified, so a listing from the index shows it.
        entries = [replace(e, mtime_ns=state.sources[e.path].mtime_ns) for e in state.entries.values()]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "index.sqlite"
            packs = write_index(path, self.prefix, entries, others)
            self.s3.put_object(self.reserved + name, path.read_bytes())
        self.s3.put_object(self.reserved + POINTER, pointer_bytes(name, len(entries), packs))
        return name


@dataclass
class VerifyReport:
    checked: int = 0
    stale: int = 0  # the source changed since packing: the mount reads the source instead
    bad: list[str] = field(default_factory=list)  # packed bytes that differ from the source

    def line(self) -> str:
        return (f"verified {self.checked} packed files: {len(self.bad)} differ from their source, "
                f"{self.stale} stale (source changed since packing; served from the source)")


def verify(s3: S3Backend, prefix: str, parallel: int) -> VerifyReport:
    """Every entry of the current index against its pack (checksum) and its source (bytes)."""
    index = Packer.current_index(s3, prefix, Path(tempfile.gettempdir()))
    if index is None:
        raise PackIndexUnusable(f"no pack index under s3://{s3.bucket}/{prefix}: run tieredfs pack first")
    try:
        entries = index.entries()
    finally:
        index.close()
        index.path.unlink(missing_ok=True)
    by_pack: dict[Pack, list[Entry]] = {}
    for e in entries:
        by_pack.setdefault(e.pack, []).append(e)
    report = VerifyReport()

    def check(pack_data: bytes, e: Entry) -> str:
        packed = pack_data[e.offset:e.offset + e.size]
        if len(packed) != e.size or checksum(packed) != e.xxh3:
            return "bad"
        try:
            source = s3.get_range(ObjectVersion(s3.bucket, prefix + e.path, e.etag, e.size), 0, e.size)
        except (ObjectChanged, ObjectMissing):
            return "stale"
        return "ok" if bytes(source) == packed else "bad"

    with ThreadPoolExecutor(parallel) as pool:
        for pack, group in by_pack.items():
            try:
                data = bytes(s3.get_range(ObjectVersion(s3.bucket, pack.key, pack.etag, pack.size),
                                          0, pack.size))
            except (ObjectChanged, ObjectMissing):
                data = b""  # replaced or deleted since indexed: none of its entries holds
            for e, result in zip(group, pool.map(lambda e: check(data, e), group)):
                report.checked += 1
                if result == "stale":
                    report.stale += 1
                elif result == "bad":
                    report.bad.append(e.path)
    return report
