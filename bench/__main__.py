"""python -m bench [--quick | --tiny] [--server rclone|moto | --endpoint-url URL] [--only W,...] [--peers]

Starts its own S3 endpoint on 127.0.0.1, writes the dataset, runs the workloads with their
reference rows, and writes bench/results/<stamp>.json, .md and .png.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import (dataset, fio, report, report_short, workloads, workloads_cluster, workloads_dirs,
               workloads_files, workloads_packs, workloads_peers)
from .context import MODES, Run
from .mounts import unwind_on_signals
from .proxy import LatencyProxy
from .servers import apply_credentials, default_server, make_endpoint

WORKLOADS = {
    "seq": workloads.sequential,
    "rand4k": workloads.random_4k,
    "multi4": workloads.multi_reader,
    "open200": workloads.many_readers,
    "small": workloads_files.small_files,
    "packed": workloads_packs.packed_small_files,  # rows of `small`: needs it first for ratios
    "ttfb": workloads_files.first_byte,
    "mount": workloads_files.mount_ready,
    "restart": workloads_files.restart,
    "bigbucket": workloads_files.big_bucket,
    "bigdir": workloads_dirs.big_directory,
    "cluster": workloads_cluster.cluster,
    "peers": workloads_peers.peer_rows,  # with --peers (rclone mount, s3fs, JuiceFS)
}
_FULL_ONLY = {"restart", "bigbucket", "bigdir"}
# Five daemons, ~30 s on the loaded CI machine: tests/test_shared.py covers what it shows.
_NOT_TINY = {"cluster"}
RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="≤ 3 minutes on 2 cores (the docs' table)")
    size.add_argument("--tiny", action="store_const", dest="mode", const="tiny",
                      help="seconds; for the unit test")
    p.add_argument("--server", choices=["rclone", "moto"], default=default_server(),
                   help="S3 endpoint to start (default: rclone if installed, else moto)")
    p.add_argument("--endpoint-url", help="use this S3 endpoint instead of starting one")
    p.add_argument("--s3-latency-ms", type=float, default=0.0,
                   help="add this much to every S3 request (a delaying proxy)")
    p.add_argument("--only", help=f"comma-separated workloads: {','.join(WORKLOADS)}")
    p.add_argument("--block-size", default="1M")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--workdir", type=Path, help="scratch dir (default: a new one in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir")
    p.add_argument("--update-docs", action="store_true",
                   help="write the tables and charts into docs/benchmarks.md")
    p.add_argument("--from-json", type=Path, metavar="RESULT.json",
                   help="measure nothing: write the docs (with --update-docs) from a results "
                        "file of bench/results/ and the charts beside it")
    p.add_argument("--peers", nargs="?", const=",".join(workloads_peers.TOOLS), metavar="TOOL,...",
                   help="also mount rclone, s3fs and JuiceFS on the same endpoint and dataset "
                        "and measure each beside tieredfs (bench/workloads_peers.py); "
                        f"or only some of {','.join(workloads_peers.TOOLS)}")
    args = p.parse_args(argv)
    args.mode = args.mode or "full"
    if args.peers:
        unknown = set(args.peers.split(",")) - set(workloads_peers.TOOLS)
        if unknown:
            p.error(f"unknown peer(s): {', '.join(sorted(unknown))}")
    return args


def selected(args) -> list[str]:
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = set(names) - set(WORKLOADS)
        if unknown:
            sys.exit(f"unknown workload(s): {', '.join(sorted(unknown))}")
    else:
        names = [n for n in WORKLOADS
                 if n != "peers" and (args.mode == "full" or n not in _FULL_ONLY)
                 and (args.mode != "tiny" or n not in _NOT_TINY)]
    if args.peers and "peers" not in names:
        names.append("peers")
    return names


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        return _from_json(args)
    unwind_on_signals()
    if not fio.available():
        sys.exit("fio not found: apt-get install fio")
    apply_credentials()
    mode = MODES[args.mode]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tieredfs-bench-", dir="/var/tmp"))
    endpoint = make_endpoint(args.server, args.endpoint_url, workdir,
                             writable=bool({"peers", "packed"} & set(selected(args))))
    proxy = None
    run = None
    started, machine = time.time(), report.machine()
    try:
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        endpoint.start()
        print(f"endpoint: {endpoint.describe()} at {endpoint.url}", flush=True)
        ds = dataset.generate(workdir / "native", mode.big, mode.multi, mode.small_files)
        dataset.publish(ds, endpoint.url, endpoint.root)
        s3_url = endpoint.url
        if args.s3_latency_ms:
            proxy = LatencyProxy(endpoint.url, args.s3_latency_ms).start()
            s3_url = proxy.url
        run = Run(mode, workdir, endpoint, s3_url, ds, args.block_size)
        run.peer_tools = (args.peers or ",".join(workloads_peers.TOOLS)).split(",")
        for name in selected(args):
            t0 = time.time()
            try:
                WORKLOADS[name](run)
            except Exception as e:  # one broken workload must not lose the others' rows
                traceback.print_exc()
                run.record(name, "error", f"{name} failed: {type(e).__name__}: {e}", "", None,
                           kind="error")
            print(f"  {name}: {time.time() - t0:.1f} s", flush=True)
    finally:
        if proxy:
            proxy.stop()
        endpoint.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    machine["loadavg_at_end"] = os.getloadavg()
    machine["new_memory_ms_per_mib_at_end"] = report.new_memory_cost()
    result = _result(args, run, endpoint, started, machine)
    paths = report.write(result, args.out, time.strftime("%Y%m%d-%H%M%S") + f"-{report.key(result)}")
    print(report.markdown(result))
    print("\n".join(f"wrote {p}" for p in paths.values()))
    if args.update_docs:
        _update_docs(result, paths)
    if any(r["kind"] == "error" for r in result["rows"]):
        sys.exit(1)
    return result


def _update_docs(result: dict, paths: dict[str, Path]) -> None:
    report.update_docs(result, paths.get("png"), DOCS)
    short = report_short.update_docs(result, report.key(result), paths.get("peers_png"), DOCS)
    print(f"updated {DOCS} ({', '.join([report.key(result), *short])})")


def _from_json(args) -> dict:
    """The docs from a run already made; its charts are drawn again beside it."""
    result = json.loads(args.from_json.read_text())
    paths = {"png": args.from_json.with_suffix(".png"),
             "peers_png": args.from_json.with_name(args.from_json.stem + "-peers.png")}
    report.chart(result, paths["png"])
    report_short.peers_chart(result, paths["peers_png"])
    print(report.markdown(result))
    if args.update_docs:
        _update_docs(result, {k: p for k, p in paths.items() if p.exists()})
    return result


def _result(args, run: Run, endpoint, started: float, machine: dict) -> dict:
    report.ratios(run.rows)
    return {
        "meta": {
            "mode": args.mode, "command": "python -m bench " + " ".join(sys.argv[1:]),
            "endpoint": endpoint.describe(), "endpoint_kind": endpoint.kind,
            "s3_latency_ms": args.s3_latency_ms, "block_size": args.block_size,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1), "git": _git_rev(),
            "machine": machine, "dataset": {
                "big": run.dataset.big_size, "multi_each": run.dataset.multi_size,
                "small_files": len(run.dataset.small), "small_bytes": run.dataset.small_bytes},
        },
        "rows": run.rows,
        "targets": report.targets(run.rows),
    }


def _git_rev() -> str:
    proc = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, cwd=Path(__file__).parent)
    return proc.stdout.strip()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
