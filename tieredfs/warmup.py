"""`tieredfs warmup`: fill a running mount's tiers by reading through it (docs/warmup.md).

Reading through the mount is the whole design: the daemon fetches, verifies and caches as
for any reader, under its own limits (S3 requests, readahead budget, cache write queue), so a
warmup runs beside live jobs without a second set of budgets. Pages are dropped from the
kernel's cache before and after each piece, so the reads reach the daemon (files already in
its tiers cost no GET) and the warmup does not flood the page cache.
"""

import concurrent.futures as cf
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import recording
from .errors import MountError, ReplayRefused
from .stats import ETAG_XATTR, MOUNT_XATTR
from .stats_view import human_bytes, read_stats, tiers

_CHUNK = 1 << 20
_MAX_PARALLEL = 64


@dataclass(frozen=True)
class Piece:
    """Bytes [offset, offset + length) of one file; length None: to its end."""

    path: Path
    offset: int = 0
    length: int | None = None


@dataclass
class Plan:
    mount: Path
    pieces: list[Piece]
    total_bytes: int
    unit: str  # what a piece is, for the bar: "files" or "runs"
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


@dataclass
class Outcome:
    done_pieces: int = 0
    done_bytes: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


def mount_root(path: Path) -> Path:
    p = path.absolute()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    read_stats(p)  # a clear error if it is not a tieredfs mount
    return p


def plan_paths(paths: list[Path], recursive: bool) -> Plan:
    mounts = {mount_root(p) for p in paths if p.exists()}
    if len(mounts) > 1:
        raise MountError(f"the paths are on {len(mounts)} mounts; warm one mount at a time")
    if not mounts:
        raise MountError("none of the paths exists")
    plan = Plan(mounts.pop(), [], 0, "files")
    for p in paths:
        if p.is_dir():
            if recursive:
                _walk(p, plan)
            else:
                plan.failures.append((str(p), "is a directory (add --recursive)"))
        else:
            _add_file(p, plan)
    return plan


def _walk(top: Path, plan: Plan) -> None:
    def fail(e: OSError) -> None:
        plan.failures.append((e.filename, e.strerror))

    for dirpath, dirnames, filenames in os.walk(top, onerror=fail):
        dirnames.sort()
        for name in sorted(filenames):
            _add_file(Path(dirpath, name), plan)


def _add_file(p: Path, plan: Plan) -> None:
    try:
        size = p.stat().st_size
    except OSError as e:
        plan.failures.append((str(p), e.strerror))
        return
    plan.pieces.append(Piece(p))
    plan.total_bytes += size


def plan_replay(replay_file: Path, mountpoint: Path) -> Plan:
    """The recorded runs as byte ranges of this mount's files, after checking that the mount
    serves the same bucket and the same version of every object."""
    rec = recording.load(replay_file)
    mount = mount_root(mountpoint)
    info = json.loads(os.getxattr(mount, MOUNT_XATTR))
    if info["bucket"] != rec.bucket:
        raise ReplayRefused(f"{replay_file} was recorded on bucket {rec.bucket!r}, "
                            f"but {mount} serves bucket {info['bucket']!r}")
    paths, changed = [], []
    for obj in rec.objects:
        if not obj.key.startswith(info["prefix"]):
            raise ReplayRefused(f"{replay_file} reads {obj.key!r}, outside the prefix "
                                f"{info['prefix']!r} that {mount} serves")
        path = mount / obj.key[len(info["prefix"]):]
        paths.append(path)
        try:
            etag = os.getxattr(path, ETAG_XATTR).decode()
        except OSError as e:
            etag = f"none ({e.strerror})"
        if etag != obj.etag:
            changed.append(f"{obj.key} (recorded {obj.etag}, now {etag})")
    if changed:
        raise ReplayRefused(f"{replay_file} was recorded on other versions of {len(changed)} "
                            f"object(s), e.g. {changed[0]}: record the job again")
    plan = Plan(mount, [], 0, "runs")
    bs = rec.block_size
    for obj_id, first, last in rec.runs:
        size = rec.objects[obj_id].size
        start, end = first * bs, min((last + 1) * bs, size)
        if start < end:
            plan.pieces.append(Piece(paths[obj_id], start, end - start))
            plan.total_bytes += end - start
    return plan


class _Stopped(Exception):
    """A piece left unfinished by Ctrl-C."""


class _Worker:
    """Reads pieces through the mount; stops between chunks once `stop` is set."""

    def __init__(self, stop: threading.Event, bar: tqdm):
        self.stop = stop
        self.bar = bar
        self.lock = threading.Lock()
        self.local = threading.local()
        self.bytes_read = 0

    def read(self, piece: Piece) -> None:
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = bytearray(_CHUNK)
        fd = os.open(piece.path, os.O_RDONLY)
        try:
            end = os.fstat(fd).st_size if piece.length is None else piece.offset + piece.length
            os.posix_fadvise(fd, piece.offset, end - piece.offset, os.POSIX_FADV_DONTNEED)
            if piece.length is not None:  # a recorded run: no kernel readahead past it
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            pos = piece.offset
            while pos < end and not self.stop.is_set():
                want = min(_CHUNK, end - pos)
                got = os.preadv(fd, [memoryview(buf)[:want]], pos)
                if got == 0:
                    raise OSError(0, f"file ended at {pos} of {end} bytes")
                os.posix_fadvise(fd, pos, got, os.POSIX_FADV_DONTNEED)
                pos += got
                with self.lock:
                    self.bar.update(got)
                    self.bytes_read += got
            if pos < end:
                raise _Stopped()
        finally:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def run(plan: Plan, parallel: int) -> Outcome:
    """Read every piece with `parallel` readers, in order of the plan; Ctrl-C stops cleanly."""
    out = Outcome(failures=list(plan.failures))
    stop = threading.Event()
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="warmup", mininterval=0.5, file=sys.stderr, dynamic_ncols=True)
    worker = _Worker(stop, bar)
    pool = cf.ThreadPoolExecutor(max(1, min(parallel, _MAX_PARALLEL)), thread_name_prefix="warmup")
    try:
        futures = {pool.submit(worker.read, p): p for p in plan.pieces}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.2)
            for fut in done:
                _settle(fut, futures[fut], out)
            bar.set_postfix_str(f"{out.done_pieces}/{len(plan.pieces)} {plan.unit}", refresh=False)
    except KeyboardInterrupt:
        out.interrupted = True
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    out.done_bytes = worker.bytes_read
    return out


def _settle(fut: cf.Future, piece: Piece, out: Outcome) -> None:
    try:
        fut.result()
        out.done_pieces += 1
    except _Stopped:
        pass
    except OSError as e:
        out.failures.append((str(piece.path), e.strerror or str(e)))


def summary(plan: Plan, out: Outcome, before: dict, after: dict, seconds: float) -> str:
    """What was read, where the mount found it (its counters' change over the warmup, so
    other readers of the mount at the same time are in it too), and what failed."""
    rate = out.done_bytes / seconds if seconds > 0 else 0.0
    lines = [f"warmed {out.done_pieces} of {len(plan.pieces)} {plan.unit}, {human_bytes(out.done_bytes)} "
             f"in {seconds:.1f} s ({human_bytes(rate)}/s)" + ("; interrupted" if out.interrupted else "")]
    served = []
    for t in tiers(after):
        hits = after.get(f"chain.hits.{t}", 0) - before.get(f"chain.hits.{t}", 0)
        nbytes = after.get(f"chain.bytes.{t}", 0) - before.get(f"chain.bytes.{t}", 0)
        if hits:
            served.append(f"{t} {hits} blocks ({human_bytes(nbytes)})")
    gets = after.get("s3.requests.get", 0) - before.get("s3.requests.get", 0)
    lines.append(f"served from: {', '.join(served) or 'the page cache only'}; S3 GETs: {gets}")
    if out.failures:
        lines.append(f"failed: {len(out.failures)}")
        lines += [f"  {path}: {why}" for path, why in out.failures]
    return "\n".join(lines)


def warm(plan: Plan, parallel: int) -> int:
    """Run the plan and print its summary; the exit code (0, 1: something failed, 130: Ctrl-C)."""
    before, start = read_stats(plan.mount), time.monotonic()
    out = run(plan, parallel)
    after = read_stats(plan.mount)
    print(summary(plan, out, before, after, time.monotonic() - start))
    return 130 if out.interrupted else 1 if out.failures else 0
