"""Warm reads from tier 1 on one mount (issue 19): what the peer rows `seq_warm`, `small_warm`
and `rand4k` measure, repeated, with the daemon's CPU and FUSE requests per MiB and per file.

    python -m bench.warm [--mib 256] [--files 2000] [--rounds 3] [--opts "..."]
                         [--only seq,small,rand4k] [--profile OUT.svg]

One mount reads everything once (cold), then each round drops the pages of the mount's
files and of the cache dir (as the peer rows do) and reads again from tier 1. Under load,
CPU per MiB or per file and requests per MiB say more than MiB/s.
"""

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import cpu, dataset, fio
from .dataset import BUCKET
from .mounts import TieredMount, drop_file_cache, drop_tree_cache, unwind_on_signals
from .servers import apply_credentials, default_server, make_endpoint

THREADS = 8
_VERBOSE = False
# Counters whose change each measurement prints: where the bytes came from, buffers made new.
_SHOWN = ("memory.pool_new", "memory.pool_reused", "local.hits", "local.corrupt",
          "chain.upper_lookups_threaded", "chain.upper_hops", "chain.part_reads_inline", "chain.part_reads_threaded",
          "readahead.walk_prefetched_bytes", "s3.requests.get", "s3.requests.list")


def _requests(before: dict, after: dict) -> dict[str, int]:
    return {k.removeprefix("fuse.requests."): after[k] - before.get(k, 0)
            for k in after if k.startswith("fuse.requests.") and after[k] - before.get(k, 0)}


def _drop(m: TieredMount, rels: list[str]) -> None:
    for rel in rels:
        drop_file_cache(m.path / rel)
    drop_tree_cache(m.cache_dir)


def _measure(m: TieredMount, what: str, rels: list[str], server_pid) -> str:
    _drop(m, rels if what == "small" else ["big"])
    before = m.stats()
    with cpu.CpuSampler(daemon=m.pid) as used:
        t0 = time.perf_counter()
        if what == "seq":
            r = fio.run("seq-read-1m", FILE=m.path / "big", INVALIDATE=1)
            value, n, unit, per = r.mib_s, r.bytes / (1 << 20), "MiB/s", "MiB"
        elif what == "rand4k":
            r = fio.run("randread-4k", FILE=m.path / "big", DIRECT=1, INVALIDATE=1, RUNTIME=5)
            value, n, unit, per = r.iops, r.bytes / 4096, "IOPS", "read"
        else:
            dataset.read_tree(m.path, rels, THREADS)
            n = len(rels)
            value, unit, per = n / (time.perf_counter() - t0), "files/s", "file"
    after = m.stats()
    reqs = _requests(before, after)
    shown = after if _VERBOSE else _SHOWN
    moved = {k: after[k] - before.get(k, 0) for k in shown
             if isinstance(after.get(k), int) and after.get(k, 0) - before.get(k, 0)}
    daemon_ms = used.result.get("daemon_s", 0) * 1000 / n
    per_unit = " ".join(f"{op}={c / n:.2f}" for op, c in sorted(reqs.items()))
    return (f"{what:6} {value:9,.0f} {unit:8} daemon CPU {daemon_ms:.3f} ms/{per}  "
            f"requests per {per}: {per_unit}\n    " + " ".join(f"{k}={v}" for k, v in moved.items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.warm", description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--opts", default="", help="extra `tieredfs mount` options")
    p.add_argument("--only", default="seq,small,rand4k")
    p.add_argument("--server", choices=["rclone", "moto"], default=default_server())
    p.add_argument("--verbose", action="store_true", help="print every counter that moved")
    p.add_argument("--profile", type=Path, help="py-spy record the daemon during the rounds (.txt: collapsed stacks)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    global _VERBOSE
    _VERBOSE = args.verbose
    unwind_on_signals()
    apply_credentials()
    workdir = Path(tempfile.mkdtemp(prefix="tieredfs-warm-", dir="/var/tmp"))
    endpoint = make_endpoint(args.server, None, workdir)
    spy = None
    try:
        (workdir / "logs").mkdir(parents=True)
        endpoint.start()
        ds = dataset.generate(workdir / "native", args.mib << 20, 0, args.files)
        dataset.publish(ds, endpoint.url, endpoint.root)
        rels = [rel for rel, _ in ds.small]
        m = TieredMount(f"s3://{BUCKET}", workdir / "mnt", endpoint.url, workdir / "cache",
                        workdir / "logs" / "daemon.log", shlex.split(args.opts))
        with m.start():
            dataset.read_tree(m.path, ["big"], 1)
            dataset.read_tree(m.path, rels, THREADS)
            m.settle()
            if args.profile:
                spy = subprocess.Popen(["py-spy", "record", "-p", str(m.pid), "-o", str(args.profile),
                                        "--rate", "200", "--threads", "--idle",
                                        *(["--format", "raw"] if args.profile.suffix == ".txt" else [])])
            for round_ in range(1, args.rounds + 1):
                for what in args.only.split(","):
                    print(f"round {round_} " + _measure(m, what, rels, endpoint.pid), flush=True)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        endpoint.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
