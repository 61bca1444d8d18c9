"""python -m bench.pack_memory [--objects 20000,100000] [--dry-run | --again]: the peak RSS of
`tieredfs pack` against the number of objects it packs (issue 21: the packer's memory).

The endpoint is bench/listserver.py with objects made up in memory (64 B to ~2 KiB each,
1,000 to a directory), which takes the packer's PUTs: packing 100,000 real files through
moto or rclone would be a benchmark of their PUT and GET paths. Each run is a new
`tieredfs pack` process on a new bucket; its peak RSS comes from wait4(). The slope between
two sizes is what one more object costs the packer.
"""

import argparse
import os
import subprocess
import sys
import time

from .servers import apply_credentials

BUCKET = "packmem"


def run_once(n: int, dry_run: bool, parallel: int, pack_size: str, again: bool, latency_ms: float) -> dict:
    # The server (its made-up objects take ~250 MiB for 1,000,000) runs in a process of its
    # own: a child's ru_maxrss starts at its parent's RSS, even across exec.
    server = subprocess.Popen([sys.executable, "-m", "bench.listserver", "--synthetic", str(n),
                               "--bucket", BUCKET, "--latency-ms", str(latency_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        cmd = [sys.executable, "-m", "tieredfs", "pack", f"s3://{BUCKET}/data", "--endpoint-url",
               url, "--parallel", str(parallel), "--pack-size", pack_size, *(["--dry-run"] if dry_run else [])]
        for _ in range(1 + again):
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            out, err = proc.stdout.read(), proc.stderr.read()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise RuntimeError(f"tieredfs pack failed ({proc.returncode}): {err.strip()[-2000:]}")
    finally:
        server.stdin.close()
        server.wait(60)
    own = _own_rss_mib()
    line = out.strip().splitlines()[-1]
    result = {"objects": n, "peak_rss_mib": usage.ru_maxrss / 1024, "seconds": seconds, "summary": line}
    if result["peak_rss_mib"] <= own * 1.1:
        print(f"  (peak RSS within 10% of this bench's own {own:.0f} MiB: it may be the bench's)")
    print(f"{n:>9,} objects{' (dry run)' if dry_run else ''}: peak RSS {result['peak_rss_mib']:.0f} MiB, "
          f"{seconds:.1f} s; {line}", flush=True)
    return result


def _own_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", default="20000,100000", help="comma-separated object counts")
    p.add_argument("--dry-run", action="store_true", help="list and plan only (no GETs, no PUTs)")
    p.add_argument("--again", action="store_true",
                   help="measure a second run over the same objects (every entry kept, nothing packed)")
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--latency-ms", type=float, default=0.0, help="the server's added latency per request")
    # Small packs: a pack's bytes are held while it is written, which would hide the slope.
    p.add_argument("--pack-size", default="4M")
    args = p.parse_args()
    apply_credentials()
    results = [run_once(int(n), args.dry_run, args.parallel, args.pack_size, args.again, args.latency_ms) for n in args.objects.split(",")]
    if len(results) > 1:
        a, b = results[0], results[-1]
        per = (b["peak_rss_mib"] - a["peak_rss_mib"]) * (1 << 20) / (b["objects"] - a["objects"])
        print(f"{per:.0f} bytes of peak RSS per object between {a['objects']:,} and {b['objects']:,}")


if __name__ == "__main__":
    main()
