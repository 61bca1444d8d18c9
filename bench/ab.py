"""Interleaved A/B of two builds on one case: how to tell a change from this machine's noise.

    python -m bench.ab REV_A REV_B [--case cold|tier1|multi4|small|small-tier1] [--rounds 4]
                       [--mib 1024] [--files 2000]
                       [--s3-latency-ms 20] [--opts-a "..."] [--opts-b "..."] [--warmup 1]
                       [--json OUT]

A REV is a git revision, checked out into a temporary worktree, or "." for this working tree
(the same REV twice with different --opts-a/--opts-b compares daemon options). Each round
runs both builds, A first in odd rounds and B first in even ones, each on a new daemon (after
one uncounted run of A: the first run after the data is written is often the slowest):
"cold" reads the file through an empty cache, "tier1" fills the cache through one daemon of
that build, then reads through a new one with the cache files' pages dropped, "multi4" is
four readers of four files, cold. "small" and "small-tier1" read --files small files (4-64
KiB in nested directories, the bench's `small` row) with 8 threads, cold or from tier 1
through a new daemon (which lists every directory again), in files/s and daemon CPU per file. Every run prints MiB/s, the daemon's and the machine's CPU
per GiB and the cores' idle share (bench/cpu.py), the daemon's peak RSS, and the pages the
kernel allocated meanwhile, as a multiple of the bytes read (bench/vmstat.py: unlike the CPU
time, it hardly drifts).

Why: whole bench runs of the same build drift by ±30% here, even 2x for a row that touches
no S3 (docs/benchmarks.md), so comparing two tables says little; A, B, B, A on the same data
and the same endpoint, minutes apart, says more.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import cpu, dataset, fio, vmstat
from .dataset import BUCKET
from .mounts import REPO, TieredMount, drop_tree_cache, unwind_on_signals
from .proxy import LatencyProxy
from .servers import apply_credentials, default_server, make_endpoint

CASES = ("cold", "tier1", "multi4", "small", "small-tier1")
_SMALL_THREADS = 8


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("rev_a")
    p.add_argument("rev_b")
    p.add_argument("--case", choices=CASES, default="cold")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1,
                   help="runs of A before round 1, not counted (the first run here is often slow)")
    p.add_argument("--mib", type=int, default=1024, help="the file's size (multi4: 4 files of a quarter)")
    p.add_argument("--files", type=int, default=2000, help="small files (the small cases)")
    p.add_argument("--s3-latency-ms", type=float, default=0.0)
    p.add_argument("--server", choices=["rclone", "moto"], default=default_server())
    p.add_argument("--opts-a", default="", help="extra `tieredfs mount` options for A")
    p.add_argument("--opts-b", default="", help="extra `tieredfs mount` options for B")
    p.add_argument("--json", type=Path, help="also write every run here")
    return p.parse_args(argv)


class Build:
    """One side of the comparison: a source tree (its own worktree unless ".") and options."""

    def __init__(self, label: str, rev: str, opts: str, workdir: Path):
        self.label, self.rev, self.opts = label, rev, shlex.split(opts)
        self.worktree = None
        self.tree = REPO
        if rev != ".":
            self.worktree = self.tree = workdir / f"build-{label}"
            _git("worktree", "add", "--detach", str(self.tree), rev)
        self.commit = _git("describe", "--always", "--dirty", cwd=self.tree).strip()
        where = subprocess.run([sys.executable, "-c", "import tieredfs; print(tieredfs.__file__)"],
                               cwd=self.tree, capture_output=True, text=True, check=True).stdout
        if not Path(where.strip()).is_relative_to(self.tree):
            raise RuntimeError(f"{rev}: `python -m tieredfs` in {self.tree} runs {where.strip()}")

    def describe(self) -> str:
        return f"{self.label}: {self.rev} ({self.commit}){' ' + shlex.join(self.opts) if self.opts else ''}"

    def remove(self) -> None:
        if self.worktree is not None:
            _git("worktree", "remove", "--force", str(self.worktree))


def _git(*args: str, cwd: Path = REPO) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class Bench:
    def __init__(self, args, workdir: Path, s3_url: str, server_pid: int | None,
                 small: list[str] = ()):
        self.args, self.workdir, self.s3_url, self.server_pid = args, workdir, s3_url, server_pid
        self.small = small
        self._n = 0

    def mount(self, build: Build, cache: Path) -> TieredMount:
        self._n += 1
        return TieredMount(f"s3://{BUCKET}", self.workdir / "mnt" / f"m{self._n}", self.s3_url, cache,
                           self.workdir / "logs" / f"daemon{self._n}.log", build.opts, cwd=build.tree).start()

    def run(self, build: Build, round_: int) -> dict:
        if self.args.case.startswith("small"):
            return self.run_small(build, round_)
        cache = self.workdir / "caches" / f"{build.label}{round_}"
        shutil.rmtree(cache, ignore_errors=True)
        if self.args.case == "tier1":
            with self.mount(build, cache) as m:
                dataset.read_tree(m.path, ["big"], 1)
                m.settle()
            drop_tree_cache(cache / "blocks")
        with self.mount(build, cache) as m, cpu.watching(daemon=m.pid, server=self.server_pid):
            pages = vmstat.allocated_pages()
            if self.args.case == "multi4":
                r = fio.run("multi-seq-4jobs", DIR=m.path / "multi", INVALIDATE=1)
            else:
                r = fio.run("seq-read-1m", FILE=m.path / "big", INVALIDATE=1)
            allocated = vmstat.per_byte_read(pages, vmstat.allocated_pages(), r.bytes)
            stats, rss = m.stats(), m.peak_rss_bytes()
        shutil.rmtree(cache, ignore_errors=True)
        g = cpu.per_gib(r.cpu, r.bytes)
        return {"build": build.label, "round": round_, "mib_s": r.mib_s, "bytes": r.bytes,
                "cpu_per_gib": g, "peak_rss_mib": rss / (1 << 20),
                "s3_gets": stats.get("s3.requests.get", 0), "allocated_per_byte_read": allocated}


    def run_small(self, build: Build, round_: int) -> dict:
        cache = self.workdir / "caches" / f"{build.label}{round_}"
        shutil.rmtree(cache, ignore_errors=True)
        if self.args.case == "small-tier1":
            with self.mount(build, cache) as m:
                dataset.read_tree(m.path, self.small, _SMALL_THREADS)
                m.settle()
            drop_tree_cache(cache / "blocks")
        with self.mount(build, cache) as m, cpu.CpuSampler(daemon=m.pid) as used:
            t0 = time.perf_counter()
            dataset.read_tree(m.path, self.small, _SMALL_THREADS)
            seconds = time.perf_counter() - t0
            stats, rss = m.stats(), m.peak_rss_bytes()
        shutil.rmtree(cache, ignore_errors=True)
        n = len(self.small)
        return {"build": build.label, "round": round_, "files_s": n / seconds,
                "daemon_ms_per_file": used.result.get("daemon_s", 0) * 1000 / n,
                "peak_rss_mib": rss / (1 << 20), "s3_gets": stats.get("s3.requests.get", 0),
                "s3_lists": stats.get("s3.requests.list", 0)}


def line(run: dict) -> str:
    if "files_s" in run:
        return (f"round {run['round']} {run['build']}: {run['files_s']:7,.0f} files/s  daemon CPU "
                f"{run['daemon_ms_per_file']:.2f} ms per file  RSS {run['peak_rss_mib']:.0f} MiB  "
                f"GETs {run['s3_gets']}  LISTs {run['s3_lists']}")
    g = run["cpu_per_gib"]
    return (f"round {run['round']} {run['build']}: {run['mib_s']:7,.0f} MiB/s  CPU per GiB: "
            f"daemon {g.get('daemon', 0):.2f} s, machine {g['busy']:.2f} s, {g['idle_share']:.0%} idle  "
            f"RSS {run['peak_rss_mib']:.0f} MiB  GETs {run['s3_gets']}"
            + (f"  new pages {a:.1f}x the bytes read" if (a := run["allocated_per_byte_read"]) else ""))


def summary(runs: list[dict], build: Build) -> str:
    mine = [r for r in runs if r["build"] == build.label]
    if mine and "files_s" in mine[0]:
        speeds = sorted(r["files_s"] for r in mine)
        daemon = sorted(r["daemon_ms_per_file"] for r in mine)
        return (f"{build.describe()}\n   files/s {' '.join(f'{v:,.0f}' for v in speeds)} (median "
                f"{statistics.median(speeds):,.0f}); daemon CPU per file "
                f"{' '.join(f'{v:.2f}' for v in daemon)} ms")
    speeds = sorted(r["mib_s"] for r in mine)
    daemon = sorted(r["cpu_per_gib"].get("daemon", 0) for r in mine)
    return (f"{build.describe()}\n   MiB/s {' '.join(f'{v:,.0f}' for v in speeds)} (median "
            f"{statistics.median(speeds):,.0f}); daemon CPU per GiB {' '.join(f'{v:.2f}' for v in daemon)} s")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    unwind_on_signals()  # through the finally below: mounts, servers, worktrees
    if not fio.available():
        sys.exit("fio not found: apt-get install fio")
    apply_credentials()
    workdir = Path(tempfile.mkdtemp(prefix="tieredfs-ab-", dir="/var/tmp"))
    endpoint = make_endpoint(args.server, None, workdir)
    proxy, builds, runs = None, [], []
    try:
        (workdir / "logs").mkdir(parents=True)
        builds = [Build("A", args.rev_a, args.opts_a, workdir)]
        builds.append(Build("B", args.rev_b, args.opts_b, workdir))
        endpoint.start()
        small = args.case.startswith("small")
        size = (1 if small else args.mib) << 20
        ds = dataset.generate(workdir / "native", size, size // 4, args.files if small else 0)
        dataset.publish(ds, endpoint.url, endpoint.root)
        s3_url = endpoint.url
        if args.s3_latency_ms:
            proxy = LatencyProxy(endpoint.url, args.s3_latency_ms).start()
            s3_url = proxy.url
        print(f"{args.case}, {args.mib} MiB, {endpoint.describe()}"
              + (f", +{args.s3_latency_ms:g} ms" if args.s3_latency_ms else ""), flush=True)
        bench = Bench(args, workdir, s3_url, endpoint.pid, [rel for rel, _ in ds.small])
        for _ in range(args.warmup):
            print("warm-up, not counted: " + line(bench.run(builds[0], 0)), flush=True)
        for round_ in range(1, args.rounds + 1):
            for build in builds if round_ % 2 else builds[::-1]:
                runs.append(bench.run(build, round_))
                print(line(runs[-1]), flush=True)
    finally:
        if proxy:
            proxy.stop()
        endpoint.stop()
        for build in builds:
            build.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(summary(runs, b) for b in builds))
    if args.json:
        args.json.write_text(json.dumps({"case": args.case, "mib": args.mib,
                                         "builds": [b.describe() for b in builds], "runs": runs},
                                        indent=1) + "\n")
    return runs


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as e:  # a revision git cannot check out, a mount that fails
        sys.exit(f"bench.ab: {e}")
