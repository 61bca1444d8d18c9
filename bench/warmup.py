"""python -m bench.warmup [--files N] [--size MiB]: `tieredfs warmup` against a cold `cat`.

Each row is a new daemon with an empty cache dir on rclone's S3 server (127.0.0.1): a cold
`cat` of every file one after the other (what a job's first pass costs), the same files in
4 parallel `cat`s, and `tieredfs warmup --recursive` at --parallel 1 and 4. A second warmup
(everything cached) is timed too. Prints a Markdown table; docs/benchmarks.md keeps a run.
"""

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .mounts import TieredMount, unwind_on_signals
from .servers import RcloneEndpoint, apply_credentials

BUCKET = "warm"
MiB = 1 << 20


def cat(paths: list[Path], parallel: int) -> None:
    def one(p: Path) -> None:
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)

    with cf.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, paths))


def warmup(mount: Path, parallel: int) -> None:
    subprocess.run([sys.executable, "-m", "tieredfs", "warmup", "--recursive", "--parallel", str(parallel),
                    str(mount / "data")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def row(work: Path, endpoint: RcloneEndpoint, name: str, run, files: list[str], total: int,
        again: bool = False) -> str:
    n = len(list(work.glob("mnt*")))
    mnt, cache = work / f"mnt{n}", work / f"cache{n}"
    with TieredMount(f"s3://{BUCKET}", mnt, endpoint.url, cache, work / f"daemon{n}.log").start() as m:
        paths = [mnt / f for f in files]
        start = time.perf_counter()
        run(mnt, paths)
        cold = time.perf_counter() - start
        gets = m.stats().get("s3.requests.get", 0)
        cells = [name, f"{total / MiB / cold:.0f}", f"{cold:.2f}", str(gets)]
        if again:
            m.settle()
            start = time.perf_counter()
            run(mnt, paths)
            second = time.perf_counter() - start
            cells.append(f"{second:.2f} s, {m.stats().get('s3.requests.get', 0) - gets} GETs")
        else:
            cells.append("")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.warmup", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--size", type=int, default=8, help="MiB per file")
    args = p.parse_args(argv)
    unwind_on_signals()
    apply_credentials()
    with tempfile.TemporaryDirectory(prefix="tieredfs-bench-warmup-") as tmp:
        work = Path(tmp)
        endpoint = RcloneEndpoint(work / "s3root")
        data = endpoint.root / BUCKET / "data"
        data.mkdir(parents=True)
        files = []
        for i in range(args.files):
            (data / f"f{i:03d}").write_bytes(os.urandom(args.size * MiB))
            files.append(f"data/f{i:03d}")
        total = args.files * args.size * MiB
        endpoint.start()
        try:
            print(f"{args.files} files x {args.size} MiB on {endpoint.describe()}\n")
            print("| row | MiB/s | seconds | S3 GETs | second run (all cached) |")
            print("|---|---:|---:|---:|---|")
            print(row(work, endpoint, "cold `cat`, one file at a time", lambda m, ps: cat(ps, 1), files, total))
            print(row(work, endpoint, "cold `cat`, 4 files at a time", lambda m, ps: cat(ps, 4), files, total))
            print(row(work, endpoint, "`tieredfs warmup --parallel 1`", lambda m, ps: warmup(m, 1), files, total))
            print(row(work, endpoint, "`tieredfs warmup --parallel 4`", lambda m, ps: warmup(m, 4), files,
                      total, again=True))
        finally:
            endpoint.stop()


if __name__ == "__main__":
    main()
