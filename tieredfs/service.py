"""The composition root: builds every component from a Config and runs the mount.

Nothing else constructs its own collaborators. Start-up checks run before the
mount exists, so a failure leaves nothing mounted.
"""

import dataclasses
import functools
import gc
import logging
import os
import resource
import shutil
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import trio

from . import fuse_ops, fusectl, signals, stale
from .config import Config, build_config
from .errors import CacheError, MountError
from .filesystem import FileSystem, ReadMeter
from .bucket_check import BucketCheck, LazyBackend, make_backend
from .index import map_size_for
from .memory import BufferPool, tune_malloc
from .namespace import Namespace
from .packs import PackRegistry
from .readahead import MemoryBudget, ReadaheadEngine, ReadaheadSettings
from .reader import Reader
from .record import Recorder
from .stats import Registry
from .tiers.chain import TierChain
from .tiers.filler import Filler
from .tiers.blockfiles import BlockFiles
from .tiers.cachedir import CacheDir, open_index
from .tiers.local import LocalTier
from .tiers.s3 import S3Tier

if TYPE_CHECKING:
    from .packer import PackOptions, Summary, VerifyReport
    from .tiers.shared import SharedTier

log = logging.getLogger(__name__)

_MIN_FREE_TO_OPEN_INDEX = 8 << 20
_FLUSH_SECONDS = 10.0  # on unmount, how long queued cache writes may still take
_DRAIN_SECONDS = 10.0  # on SIGTERM, how long reads in flight may still take (the unit's stop
                       # timeout of 30 s covers this and the flush)
_FDS_BESIDES_BLOCK_FILES = 512  # S3 connections, LMDB, /dev/fuse, logs, listings in flight


def check_mountpoint(path: Path) -> None:
    if stale.is_dead_mount(path):
        stale.detach(path)  # a killed daemon's mount: nothing to save on it
        log.warning("event=dead_mount_detached mountpoint=%s reason=%r action=lazy_unmount", path,
                    "its daemon is gone (Transport endpoint is not connected)")
    try:
        st = os.stat(path)
        if os.path.ismount(path):
            # A dead FUSE mount may still answer stat() from the kernel's cache; listing it may not.
            os.listdir(path)
    except FileNotFoundError:
        raise MountError(f"mount point {path} does not exist") from None
    except OSError as e:
        if e.errno in stale.DEAD_MOUNT_ERRNOS:
            raise _dead_mount(path) from None
        raise MountError(f"mount point {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        try:
            os.statvfs(path)  # never answered from the kernel's attribute cache, unlike stat
        except OSError as e:
            if e.errno in stale.DEAD_MOUNT_ERRNOS:
                raise _dead_mount(path) from None
        raise MountError(f"mount point {path} is already a mount point (busy)")


def _dead_mount(path: Path) -> MountError:
    return MountError(f"mount point {path} is a dead mount (its daemon is gone): "
                      f"run 'tieredfs umount {path}' first")


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: install fuse3 and load the fuse kernel module")
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 not found: install the fuse3 package")


class Daemon:
    """Every component of one mount, wired together."""

    def __init__(self, config: Config):
        self.config = config
        self.registry = Registry()
        c = config
        # Blocks prefetched and unread, and blocks waiting for the cache disk, are the buffers
        # held at once by design: that much is kept for reuse.
        self.buffers = BufferPool(keep=c.readahead_budget + c.cache_write_queue,
                                  counters=self.registry.counters("memory"))
        self.registry.add_source(self.buffers.gauges)
        # Issue 19: the client is made on first use (bucket_check.py, start-up time).
        s3_counters = self.registry.counters("s3")
        self.backend = LazyBackend(functools.partial(make_backend, c, s3_counters, self.buffers,
                                                     crt_later=True),
                                   c.bucket, s3_counters)
        self.registry.add_source(self.backend.gauges)
        self.cache_dir = CacheDir(c.effective_cache_dir)
        self.cache_dir.create()
        self.cache_dir.lock(str(c.mountpoint))
        self.packs = PackRegistry(c.bucket, self.backend.get_object, self.backend.get_file,
                                  c.effective_cache_dir / "packs",
                                  c.list_ttl, self.registry.counters("packs"), root=c.prefix,
                                  listing_from_index=c.listing_from_index)
        self.registry.add_source(self.packs.gauges)
        # Issue 19: listings kept across restarts (listings_store.py, docs/namespace.md).
        self.listings = _listing_store(c, self.registry.counters("listings"))
        self.namespace = Namespace(c.prefix, self.packs.list_dir(self.backend.list_dir), c.list_ttl,
                                   time.time_ns(),
                                   refresh_dir=self.packs.list_dir(self.backend.list_dir, attempts=1),
                                   on_listed=self.packs.listed, store=self.listings,
                                   list_tree=self.backend.list_tree)
        self.registry.add_source(self.namespace.gauges)
        self.capacity = 0
        self.local = self._build_local_tier()
        self.upper_tiers = [self.local] if self.local else []
        # Issue 23: --record and --metrics-addr (record.py, metrics.py).
        self.recorder = Recorder(c.record, c.bucket, c.prefix, c.block_size,
                                 self.registry.counters("record")) if c.record else None
        self.metrics = None

    def _build_local_tier(self) -> LocalTier | None:
        c = self.config
        st = os.statvfs(self.cache_dir.path)
        capacity = c.cache_size_bytes(st.f_blocks * st.f_frsize)
        map_size = c.cache_index_size or map_size_for(capacity, c.block_size)
        free = st.f_bavail * st.f_frsize
        try:
            if free < _MIN_FREE_TO_OPEN_INDEX:
                # LMDB writes its lock file through mmap: on a full tmpfs that is SIGBUS, not ENOSPC.
                raise CacheError(f"only {free} bytes free on the cache disk")
            index = open_index(self.cache_dir, map_size)
        except CacheError as e:
            log.warning("event=cache_unusable dir=%s error=%r action=serving_from_s3_only",
                        self.cache_dir.path, str(e))
            return None
        self.capacity = capacity
        files = BlockFiles(self.cache_dir.file_path, _open_block_files_limit(c.cache_open_files),
                           self.buffers)
        local = LocalTier(self.cache_dir, index, files, capacity=capacity,
                          min_free=c.cache_min_free, counters=self.registry.counters("local"))
        self.registry.add_source(local.gauges)
        return local

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.recorder:
            self.recorder.close()
        if self.local:
            self.local.close()
        self.backend.close()
        if self.listings:
            self.listings.close()
        self.cache_dir.unlock()

    def check_remote(self) -> None:
        self.backend.check_bucket()

    def build_fs(self) -> tuple[FileSystem, ReadaheadEngine]:
        """Objects bound to the trio run (limiters) are built inside it."""
        c = self.config
        request_blocks = max(1, min(c.request_size, c.readahead_budget) // c.block_size)
        disk = trio.CapacityLimiter(c.max_threads)
        self.filler = Filler(self.upper_tiers, max_bytes=c.cache_write_queue,
                             max_wait=c.cache_fill_wait, writers=4,
                             limiter=disk, counters=self.registry.counters("chain"))
        self.registry.add_source(self.filler.gauges)
        self.shared = self._build_shared_tier()
        chain = TierChain(
            self.upper_tiers, S3Tier(self.backend), self.filler,
            disk_limiter=disk,
            s3_limiter=trio.CapacityLimiter(c.s3_max_requests),
            max_span=request_blocks,
            counters=self.registry.counters("chain"), latency=self.registry.histogram,
            shared=self.shared, read_deadline=c.read_deadline)
        settings = ReadaheadSettings(
            block_size=c.block_size, min_window=min(2, c.readahead_max // c.block_size),
            max_window=c.readahead_max // c.block_size, request_blocks=request_blocks,
            small_object=c.small_file_threshold, idle_seconds=c.readahead_idle)
        counters = self.registry.counters("readahead")
        # Demand reads keep a quarter of the S3 slots: prefetch never queues them all behind it.
        engine = ReadaheadEngine(chain, settings, MemoryBudget(c.readahead_budget, counters),
                                 trio.CapacityLimiter(max(1, c.s3_max_requests * 3 // 4)), counters)
        self.registry.add_source(engine.gauges)
        reader = Reader(c.block_size, engine, recorder=self.recorder)
        fs = FileSystem(self.namespace, reader, c.bucket, trio.CapacityLimiter(c.s3_max_requests),
                        self.registry.snapshot, dir_prefetch=c.dir_prefetch,
                        tree_keys=0 if c.listing_from_index else c.list_tree_keys, packs=self.packs,
                        # (half the budget at most: the files being read need their share)
                        pack_readahead=min(c.pack_readahead, c.readahead_budget // 2),
                        meter=ReadMeter(self.registry.counters("fs"), self.registry.histogram("fuse.read")))
        if c.metrics_addr:
            from .metrics import Collector, MetricsServer  # prometheus_client only when asked for

            self.metrics = MetricsServer(c.metrics_addr, Collector(
                fs.stats, self.registry.histograms, self.capacity))
        return fs, engine

    def _build_shared_tier(self) -> "SharedTier | None":
        """Tier 2 (docs/shared-tier.md). Its directory is touched only in its own workers,
        first when its task starts: a hung share must not hold up the mount."""
        c = self.config
        if c.shared_dir is None:
            return None
        # Imported only when configured: start-up time (issue 19).
        from .tiers.shared import SharedTier
        from .tiers.shared_format import Layout
        from .tiers.shared_gc import Collector
        from .tiers.shared_store import SharedStore

        layout, perms = Layout(c.shared_dir, c.effective_shared_namespace), c.shared_perms()
        counters = self.registry.counters("shared")
        # A dead holder's lease keeps others waiting at most lease_wait; it expires later.
        store = SharedStore(layout, perms, counters, lease_ttl=max(2 * c.shared_lease_wait, 1.0))
        tier = SharedTier(store, Collector(layout, perms, c.shared_quota), threads=c.shared_threads,
                          timeout=c.shared_timeout, lease_wait=c.shared_lease_wait,
                          publish_queue=c.shared_publish_queue, counters=counters,
                          readback=self._readback if self.local else None,
                          latency=self.registry.histogram("shared"))
        self.registry.add_source(tier.gauges)
        return tier

    def _readback(self, ref):
        """A block this node fetched, for the shared tier's publisher (worker thread)."""
        return self.filler.pending(ref) or self.local.get(ref)

    def fuse_options(self) -> set[str]:
        return {"fsname=tieredfs", "subtype=tieredfs", "ro", "default_permissions",
                *self.config.fuse_options}


def run(config: Config, on_ready: Callable[[], None], control: signals.Control | None = None,
        check: BucketCheck | None = None) -> None:
    """Check, mount, serve until unmounted or signalled, clean up. With `check` (a bucket
    check begun in another process), the mount is made meanwhile and ready once it says yes."""
    control = control or signals.Control()
    gc.disable()  # until ready: see _collect_from_now_on
    try:
        _run(config, on_ready, control, check)
    finally:
        gc.enable()


def _collect_from_now_on() -> None:
    """Start-up's objects (modules, botocore's models, ~0.4 s of CPU to make) live until exit:
    the cyclic collector's passes over them while they were made were ~10% of that CPU, and
    its later full passes would walk them again. Frozen, they are left out (issue 19)."""
    gc.freeze()
    gc.enable()


def _run(config: Config, on_ready: Callable[[], None], control: signals.Control,
         check: BucketCheck | None) -> None:
    try:
        check_mountpoint(config.mountpoint)
        check_fuse()
        tune_malloc()
        daemon = Daemon(config)
        try:
            control.notifier.status(f"checking s3://{config.bucket}")
            if check is None:
                daemon.check_remote()
            trio.run(_serve, daemon, on_ready, control, check)
        finally:
            daemon.close()
    finally:
        if check is not None:
            check.close()


async def _serve(daemon: Daemon, on_ready: Callable[[], None], control: signals.Control,
                 check: BucketCheck | None = None) -> None:
    c = daemon.config
    fs, engine = daemon.build_fs()
    ops = fuse_ops.FuseOps(fs, uid=c.uid, gid=c.gid, attr_timeout=min(c.list_ttl, 60.0),
                           block_size=c.block_size, capacity=daemon.capacity,
                           file_mode=c.file_mode, dir_mode=c.dir_mode,
                           requests=daemon.registry.counters("fuse.requests"))
    signals.hold()
    try:
        fuse_ops.mount(ops, str(c.mountpoint), daemon.fuse_options())
    except RuntimeError as e:
        raise MountError(f"cannot mount on {c.mountpoint}: {e}") from None
    session = _Session()
    # The cache writers outlive the mount's other tasks: blocks fetched for a reader up to the
    # unmount are still written, so a clean restart finds everything that was read.
    async with trio.open_nursery() as writers:
        writers.start_soon(daemon.filler.run)
        if daemon.shared:
            writers.start_soon(daemon.shared.run)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(signals.watch, functools.partial(session.drain, nursery.cancel_scope),
                                   control, c, functools.partial(_apply, daemon, ops))
                nursery.start_soon(session.serve, nursery.cancel_scope, c.fuse_max_requests)
                engine.start(nursery)
                fs.start(nursery)
                if daemon.recorder:
                    nursery.start_soon(daemon.recorder.run)
                # Ready only once the mount answers a request.
                st = await trio.to_thread.run_sync(os.stat, c.mountpoint)
                session.answered()
                if check is not None and not await trio.to_thread.run_sync(check.result):
                    await trio.to_thread.run_sync(daemon.check_remote)  # the checker was lost
                if c.kernel_readahead:
                    # In a worker thread, as the stat: the mount's own requests need the loop.
                    await trio.to_thread.run_sync(_tune_kernel_readahead, st.st_dev, c.kernel_readahead)
                await trio.to_thread.run_sync(fusectl.raise_max_background, st.st_dev,
                                              c.fuse_max_background)
                log.info("event=mounted bucket=%s prefix=%r mountpoint=%s cache_dir=%s capacity=%d",
                         c.bucket, c.prefix, c.mountpoint, daemon.cache_dir.path, daemon.capacity)
                _collect_from_now_on()
                on_ready()
                session.ready = True
                # The S3 clients, soon: botocore's, then awscrt's (S3Backend.start_crt).
                nursery.start_soon(trio.to_thread.run_sync, daemon.backend.start_crt)
                nursery.start_soon(_trim_buffers, daemon.buffers)
                if daemon.local:
                    nursery.start_soon(_sweep_orphans, daemon.local)
        finally:
            fuse_ops.close(unmount=not session.ended_by_kernel)
            # A mount undone before it was ready (the bucket check said no) is the error's line.
            (log.info if session.ready else log.debug)("event=unmounted mountpoint=%s", c.mountpoint)
            control.notifier.stopping("unmounted; flushing cache writes")
            with trio.move_on_after(_FLUSH_SECONDS, shield=True):
                await daemon.filler.flush()
                if daemon.shared:
                    await daemon.shared.flush()
            writers.cancel_scope.cancel()


def pack(url: str, endpoint_url: str | None, region: str | None, options: "PackOptions",
         check: bool, gc: tuple[int, float] | None = None):
    """`tieredfs pack` (docs/packs.md): the packer over its own S3 client; then, with `gc`
    (versions kept, grace seconds), the garbage collection of packgc.py."""
    from .packer import Packer, verify as verify_packs  # (tqdm with it) not needed to mount
    from .packgc import collect as collect_packs

    # As a mount does: without it, 16 fetching threads' malloc arenas grew the packer's RSS
    # by ~85 bytes per object packed (bench/pack_memory.py).
    tune_malloc()
    c = build_config(url, {}, {"endpoint_url": endpoint_url, "region": region})
    # The sources are small GETs: the same client choice as a mount's (awscrt where it wins).
    backend = make_backend(dataclasses.replace(c, s3_max_requests=options.parallel + 2),
                           Registry().counters("s3"))
    try:
        backend.check_bucket()
        summary = Packer(backend, c.prefix, options).run()
        report = (verify_packs(backend, c.prefix, options.parallel)
                  if check and not options.dry_run else None)
        collected = collect_packs(backend, c.prefix, *gc, dry_run=options.dry_run) if gc else None
    finally:
        backend.close()
    return summary, report, collected


def _listing_store(c: Config, counters):
    if not c.persist_listings:
        return None
    from .listings_store import ListingStore, identity  # sqlite3 only when used

    return ListingStore(c.effective_cache_dir / "listings.sqlite",
                        identity(c.endpoint_url, c.region, c.bucket), c.listings_size, counters)


def _open_block_files_limit(wanted: int) -> int:
    """How many tier-1 files may stay open: the soft descriptor limit (often 1024) is raised
    to make room for them, up to the hard limit; with less room, fewer stay open."""
    need = wanted + _FDS_BESIDES_BLOCK_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    usable = wanted if soft == resource.RLIM_INFINITY else min(wanted, soft - _FDS_BESIDES_BLOCK_FILES)
    if usable < wanted:
        log.warning("event=open_file_limit_low cache_open_files=%d usable=%d", wanted, max(1, usable))
    return max(1, usable)


def _tune_kernel_readahead(dev: int, nbytes: int) -> None:
    """Let the kernel send 1 MiB reads and keep several in flight (its default is 128 KiB)."""
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        knob.write_text(str(max(4, nbytes // 1024)))
    except OSError as e:
        log.info("event=kernel_readahead_unchanged knob=%s error=%r (needs root)", knob, e.strerror)


class _Session:
    ended_by_kernel = False
    ready = False
    draining = False
    _stop_scope: trio.CancelScope | None = None
    _answered = False

    async def serve(self, scope: trio.CancelScope, max_tasks: int) -> None:
        await fuse_ops.serve(max_tasks)
        self.ended_by_kernel = not self.draining  # fusermount3 -u: nothing left to unmount
        scope.cancel()

    def drain(self, scope: trio.CancelScope) -> None:
        """Take no new request; those in flight get _DRAIN_SECONDS to answer, then are cut."""
        self._stop_scope = scope
        if self._answered:  # else the start-up stat, in a thread nothing can cancel, would hang
            self._terminate()

    def answered(self) -> None:
        self._answered = True
        if self._stop_scope:  # a stop asked for during start-up
            self._terminate()

    def _terminate(self) -> None:
        self.draining = True
        fuse_ops.terminate()
        self._stop_scope.deadline = min(self._stop_scope.deadline, trio.current_time() + _DRAIN_SECONDS)


def _apply(daemon: Daemon, ops: fuse_ops.FuseOps, config: Config) -> None:
    """A SIGHUP's new values of the settings in signals.RELOADABLE."""
    signals.apply_log_level(config)
    daemon.namespace.ttl = config.list_ttl
    ops.attr_timeout = min(config.list_ttl, 60.0)


async def _trim_buffers(buffers: BufferPool, period: float = 30.0) -> None:
    """An idle daemon gives back the buffers its last busy spell left in the pool."""
    while True:
        await trio.sleep(period)
        buffers.trim()


async def _sweep_orphans(local: LocalTier, first_delay: float = 10.0, period: float = 3600.0) -> None:
    """Remove files a crash left without an index entry; gently, never at start-up. A sweep
    that fails is logged and tried again next period: it must never end the mount."""
    await trio.sleep(first_delay)
    while True:
        try:
            for subdir in await trio.to_thread.run_sync(local.fanout_dirs):
                await trio.to_thread.run_sync(local.sweep_dir, subdir)
                await trio.sleep(0.01)
        except Exception:
            local.counters.add("sweep_bugs")
            log.exception("event=orphan_sweep_failed action=retry_next_period")
        await trio.sleep(period)
