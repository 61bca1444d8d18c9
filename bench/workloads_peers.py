"""The peer rows (python -m bench --peers): tieredfs, rclone mount, s3fs and JuiceFS, each
on a fresh mount with an empty cache, measured one after the other the same way:

  ready       seconds from spawning the daemon to a mount that answers a stat
  seq_cold    fio 1 MiB sequential read of `big` (page cache dropped first)
  seq_warm    the same again on the same mount, with the file's pages and the tool's cache
              dir's pages dropped: the bytes come from the tool's own cache on disk
  small_cold  every small file read whole by 8 threads (files/s), listings included
  small_warm  the same again, pages dropped as for seq_warm
  rand4k      4 KiB random O_DIRECT reads of `big` (now in the tool's cache), queue depth 1
  rss         the daemon's peak resident set (VmHWM) over all of the above

A peer that cannot be installed or mounted gets rows with no value and a note saying why;
the run goes on. Each mount is stopped (unmount, then its PID) whatever happens.
"""

import os
import shutil
import time
from pathlib import Path

from . import fio, peers
from .context import MiB, Run, _daemon_share
from .cpu import watching
from .dataset import BUCKET, client, read_tree
from .mounts import TieredMount, drop_file_cache, drop_tree_cache

THREADS = 8
TOOLS = ("tieredfs", *peers.PEERS)
# (key, what, unit, higher is better): the order of the table's rows.
ROWS = (
    ("seq_cold", "cold sequential (fio 1 MiB)", "MiB/s", True),
    ("seq_warm", "warm sequential, own cache (page cache dropped)", "MiB/s", True),
    ("small_cold", f"small files cold, {THREADS} threads", "files/s", True),
    ("small_warm", f"small files warm, own cache, {THREADS} threads", "files/s", True),
    ("rand4k", "4 KiB random, O_DIRECT, own cache", "IOPS", True),
    ("ready", "mount ready", "s", False),
    ("rss", "peak RSS", "MiB", False),
)


def peer_rows(run: Run) -> None:
    scratch = run.workdir / "peers"
    scratch.mkdir(parents=True, exist_ok=True)
    target = peers.Target(run.s3_url, BUCKET, scratch)
    tools = [t for t in TOOLS if t in getattr(run, "peer_tools", TOOLS)]
    juicefs_note = _load_juicefs(run, target) if "juicefs" in tools else None
    for tool in tools:
        note = juicefs_note if tool == "juicefs" else None
        _measure_tool(run, tool, lambda t=tool: _mount(run, t, target), note)


def _mount(run: Run, tool: str, target: peers.Target):
    cache = run.fresh_cache(f"peer-{tool}")
    if tool == "tieredfs":
        return run.tiered(cache)
    path, log = run.workdir / "mnt" / f"peer-{tool}", run.workdir / "logs" / f"peer-{tool}.log"
    return peers.MOUNTERS[tool](target, path, cache, log)


def _load_juicefs(run: Run, target: peers.Target) -> str | None:
    """Format a JuiceFS volume and copy the dataset's `big` and small files into it (JuiceFS
    reads only what it wrote, in its own format); None, or why JuiceFS has no rows."""
    direct = run.endpoint.url  # set-up goes around the latency proxy
    log = run.workdir / "logs" / "peer-juicefs-load.log"
    try:
        s3 = client(direct)
        try:
            s3.create_bucket(Bucket=BUCKET + peers.JUICEFS_BUCKET_SUFFIX)
        except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            pass
        peers.juicefs_format(target, direct, log)
        loader_target = peers.Target(direct, target.bucket, target.scratch)
        m = peers.juicefs(loader_target, run.workdir / "mnt" / "peer-juicefs-load",
                          run.fresh_cache("peer-juicefs-load"), log)
        try:
            m.start()
            t0 = time.perf_counter()
            _copy(run.dataset.root, m.path, ["big", *(rel for rel, _ in run.dataset.small)])
            print(f"  juicefs: dataset loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        finally:
            m.stop()
            shutil.rmtree(m.cache_dir, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - the row says why; the other tools still run
        return "could not load the dataset: " + peers.failure(e, log)
    return None


def _copy(src: Path, dst: Path, rels: list[str]) -> None:
    for rel in rels:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(src / rel, "rb") as f, open(dst / rel, "wb") as out:
            while chunk := f.read(4 * MiB):
                out.write(chunk)


def _measure_tool(run: Run, tool: str, make_mount, note: str | None) -> None:
    values: dict[str, tuple[float | None, dict]] = {}
    notes: dict[str, str] = {}
    m = None
    try:
        if note is None:
            m = make_mount()
            m.start()
            values["ready"] = (m.ready_seconds, {})
            with watching(daemon=m.pid, server=run.endpoint.pid):
                _steps(run, m, values, notes)
            values["rss"] = (m.peak_rss_bytes() / MiB, {})
    except Exception as e:  # noqa: BLE001 - a peer that will not mount: its rows say why
        note = peers.failure(e, getattr(m, "log", None))
    finally:
        if m is not None:
            m.stop()
            shutil.rmtree(m.cache_dir, ignore_errors=True)  # a few hundred MiB per tool
    version = "" if tool == "tieredfs" else peers.version(tool)
    for key, what, unit, _ in ROWS:
        value, details = values.get(key, (None, {}))
        why = notes.get(key) or (note if value is None else None)
        run.record("peers", f"{key}.{tool}", f"{tool}: {what}", unit, value, details,
                   kind="peer", tool=tool, row=key, version=version,
                   **({"note": why} if why else {}))
    print(f"  peers: {tool} done" + (f" ({note})" if note else ""), flush=True)


def _steps(run: Run, m, values: dict, notes: dict) -> None:
    """Each measurement in turn; one that fails leaves a note and the next still runs."""
    big, rels = m.path / "big", [rel for rel, _ in run.dataset.small]

    def seq():
        r = fio.run("seq-read-1m", FILE=big, INVALIDATE=1)
        return r.mib_s, {"bytes": r.bytes, "seconds": r.seconds, "cpu": r.cpu}

    def small():
        t0 = time.perf_counter()
        n = read_tree(m.path, rels, THREADS)
        seconds = time.perf_counter() - t0
        return len(rels) / seconds, {"bytes": n, "seconds": seconds, "files": len(rels)}

    def rand():
        r = fio.run("randread-4k", FILE=big, DIRECT=1, INVALIDATE=1, RUNTIME=run.mode.fio_runtime)
        return r.iops, {"bytes": r.bytes, "seconds": r.seconds, "cpu": r.cpu}

    for key, fn, before in (("seq_cold", seq, None),
                            ("seq_warm", seq, lambda: _own_cache_only(m, ["big"])),
                            ("small_cold", small, None),
                            ("small_warm", small, lambda: _own_cache_only(m, rels)),
                            ("rand4k", rand, None)):
        try:
            if before:
                before()
            stats = m.stats() if isinstance(m, TieredMount) else None
            values[key] = fn()
            if stats is not None:  # what tieredfs did for the row: S3 requests, tier-1 hits
                values[key][1]["daemon"] = _daemon_share(stats, m.stats())
        except Exception as e:  # noqa: BLE001
            notes[key] = peers.failure(e)


def _own_cache_only(m, rels: list[str]) -> None:
    """After a cold read: let the tool finish writing its cache, then drop the pages of the
    mount's files and of the cache dir, so a re-read comes from the tool's cache on disk."""
    if isinstance(m, TieredMount):
        m.settle()
    os.sync()
    for rel in rels:
        drop_file_cache(m.path / rel)
    drop_tree_cache(m.cache_dir)
