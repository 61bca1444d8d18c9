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
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .blocks import ObjectVersion
from .errors import ObjectChanged, ObjectMissing, PackIndexUnusable
from .packindex import (FORMAT, POINTER, RESERVED, Entry, Pack, PackIndex, checksum, index_name_of,
                        pointer_bytes, reserved_prefix)
from .packwork import PackWork, downloaded_index, work_dir
from .tiers.s3 import ListedObject, S3Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackOptions:
    max_file_size: int = 1 << 20
    pack_size: int = 64 << 20
    # Each source is one small GET: at 20 ms a request, 16 at once packed 707 files/s and 64
    # 2,185; on loopback 64 cost 9% of 16's speed (bench/pack_memory.py --latency-ms).
    parallel: int = 64
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
        with work_dir("pack") as tmp:
            work = PackWork(tmp, self.prefix)
            try:
                pack_objects, indexed_packs = self._state(work, summary, tmp)
                if not self.o.dry_run:
                    summary.adopted = self._adopt(work, pack_objects, indexed_packs)
                files, size = work.plan(self.o.max_file_size)
                if self.o.dry_run:
                    summary.files, summary.bytes = files, size
                    summary.packs = sum(1 for _ in self._groups(work.todo()))
                else:
                    self._pack_all(work, size, summary)
                    entries, packs, others_changed = work.finish()
                    if summary.files or summary.adopted or summary.dropped or others_changed:
                        summary.index = self._publish(work, entries, packs)
            finally:
                work.close()
        summary.seconds = time.monotonic() - t0
        return summary

    # --- what is there ---------------------------------------------------------------------

    def _state(self, work: PackWork, summary: Summary, tmp: Path) -> tuple[dict[str, ListedObject], set[str]]:
        """The listing into `work`, then the last index's entries that still hold. Returns
        the reserved prefix's pack and manifest objects (key -> object), and the packs the
        last index names."""
        n = len(self.prefix)
        pack_objects: dict[str, ListedObject] = {}
        for page in self.s3.list_pages(self.prefix):
            # Not the packs of this prefix, nor those of a packed prefix below it.
            work.add_sources((o.key[n:], o) for o in page if f"/{RESERVED}/" not in f"/{o.key[n:]}")
            pack_objects.update((o.key, o) for o in page if o.key.startswith(self.reserved + "packs/"))
        index = self.current_index(self.s3, self.prefix, tmp)
        if index is None:
            return pack_objects, set()
        indexed_packs, lists_all = {p.key for p in index.packs.values()}, index.lists_all
        index.close()
        summary.kept, summary.dropped = work.keep(index.path, {k: o.etag for k, o in pack_objects.items()},
                                                  lists_all)
        return pack_objects, indexed_packs

    @staticmethod
    def current_index(s3: S3Backend, prefix: str, workdir: Path) -> PackIndex | None:
        """The index the pointer names, downloaded into the work dir `workdir`; None if none yet."""
        where = reserved_prefix(prefix) + POINTER
        try:
            pointer, _ = s3.get_object(where)
        except ObjectMissing:
            return None
        return downloaded_index(s3, reserved_prefix(prefix) + index_name_of(pointer, where),
                                workdir / "last-index.sqlite")

    def _adopt(self, work: PackWork, pack_objects: dict[str, ListedObject], indexed_packs: set[str]) -> int:
        """Entries of packs that an interrupted run wrote (with their manifest) but never indexed."""
        adopted = 0
        for key, obj in sorted(pack_objects.items()):
            if not key.endswith(".json"):
                continue
            pack_key = key[:-len(".json")] + ".pack"
            pack_obj = pack_objects.get(pack_key)
            if pack_key in indexed_packs or pack_obj is None:
                continue
            data, _ = self.s3.get_object(key)
            try:
                doc = json.loads(data)
                rows = doc["entries"] if doc.get("format") == FORMAT else []
            except (ValueError, KeyError, AttributeError):
                log.warning("event=pack_manifest_unreadable key=%r action=ignored", key)
                continue
            adopted += work.adopt(Pack(pack_key, pack_obj.etag, pack_obj.size), rows)
        return adopted

    # --- writing packs -----------------------------------------------------------------------

    def _groups(self, todo: Iterable[ListedObject]) -> Iterator[list[ListedObject]]:
        """The objects in packs of up to --pack-size, in order; one pack's objects at a time."""
        group, size = [], 0
        for o in todo:
            if group and size + o.size > self.o.pack_size:
                yield group
                group, size = [], 0
            group.append(o)
            size += o.size
        if group:
            yield group

    def _pack_all(self, work: PackWork, total: int, summary: Summary) -> None:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="packing",
                  disable=None if self.o.progress else True) as bar, \
                ThreadPoolExecutor(self.o.parallel) as pool:
            for n, group in enumerate(self._groups(work.todo())):
                pack, rows = self._write_pack(n, group, pool, bar)
                if pack is not None:
                    work.packed(pack, rows)
                summary.files += len(rows)
                summary.bytes += sum(row[2] for row in rows)
                summary.skipped += len(group) - len(rows)
                summary.packs += pack is not None
                bar.set_postfix(files=summary.files, packs=summary.packs, refresh=False)

    def _write_pack(self, n: int, group: list[ListedObject], pool: ThreadPoolExecutor,
                    bar) -> tuple[Pack | None, list[tuple]]:
        """One pack of the group's sources and its manifest; (the pack, its rows (path, etag,
        size, offset, xxh3)), or (None, []) if every source changed since the listing."""
        def fetch(o: ListedObject) -> bytes | None:
            try:
                data = self.s3.get_range(ObjectVersion(self.s3.bucket, o.key, o.etag, o.size), 0, o.size)
            except (ObjectChanged, ObjectMissing):
                return None  # changed since the listing: the next run packs the new version
            bar.update(o.size)
            return data

        # Made at its full size once: growing it by += copied it as it grew (a pack's size
        # more at the peak). A source that changed meanwhile leaves its room at the end.
        body, rows, end = bytearray(sum(o.size for o in group)), [], 0
        for o, data in in_order(pool, fetch, group, 2 * self.o.parallel):
            if data is not None:
                rows.append((o.key[len(self.prefix):], o.etag, o.size, end, checksum(data)))
                body[end:end + o.size] = data
                end += o.size
        if not rows:
            return None, []
        del body[end:]
        key = f"{self.reserved}packs/{self.run_id}-{n:05d}"
        etag = self.s3.put_object(key + ".pack", body)  # not copied: botocore sends a bytearray
        # After the pack: a manifest names only a pack that exists.
        self.s3.put_object(key + ".json", json.dumps({"format": FORMAT, "entries": rows}).encode())
        return Pack(key + ".pack", etag, len(body)), rows

    def _publish(self, work: PackWork, entries: int, packs: int) -> str:
        """The index version, then the pointer naming it (last: the only overwrite)."""
        name = f"index/{self.run_id}.sqlite"
        self.s3.put_file(self.reserved + name, work.index_path)
        self.s3.put_object(self.reserved + POINTER, pointer_bytes(name, entries, packs))
        return name


def in_order(pool: ThreadPoolExecutor, fn, items: Iterable, window: int) -> Iterator[tuple]:
    """(item, fn(item)) in the items' order, with at most `window` calls submitted at once:
    ThreadPoolExecutor.map submits them all, a future each (a pack of 60,000 small files
    held ~60 MiB of them, bench/pack_memory.py)."""
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


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
    with work_dir("verify") as tmp:
        index = Packer.current_index(s3, prefix, tmp)
        if index is None:
            raise PackIndexUnusable(f"no pack index under s3://{s3.bucket}/{prefix}: run tieredfs pack first")
        try:
            return _verify_packs(s3, prefix, parallel, index)
        finally:
            index.close()


def _verify_packs(s3: S3Backend, prefix: str, parallel: int, index: PackIndex) -> VerifyReport:
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
        for pack, group in index.entries_by_pack():
            try:
                data = bytes(s3.get_range(ObjectVersion(s3.bucket, pack.key, pack.etag, pack.size),
                                          0, pack.size))
            except (ObjectChanged, ObjectMissing):
                data = b""  # replaced or deleted since indexed: none of its entries holds
            for e, result in in_order(pool, lambda e: check(data, e), group, 2 * parallel):
                report.checked += 1
                if result == "stale":
                    report.stale += 1
                elif result == "bad":
                    report.bad.append(e.path)
    return report
