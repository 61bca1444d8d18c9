"""Packed small files (docs/packs.md): the `small` workload's tree packed with `tieredfs pack`,
then read cold with the same 8 threads as the unpacked rows; and the packer's own throughput
against one boto3 GET per file. The packs are deleted afterwards, so the workloads that follow
read the tree unpacked, as they were written to.
"""

import subprocess
import sys
import time

from .context import MiB, Run
from .dataset import BUCKET, client
from .workloads_files import THREADS, files_per_s

_PREFIX = "small"


def packed_small_files(run: Run) -> None:
    w, ds = "small", run.dataset
    rels = [p for p, _ in ds.small]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tieredfs", "pack", f"s3://{BUCKET}/{_PREFIX}",
                           "--endpoint-url", run.s3_url, "--parallel", str(THREADS)],
                          capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"tieredfs pack failed: {done.stderr.strip()}")
    try:
        run.record(w, "pack", f"tieredfs pack, {THREADS} parallel GETs (incl. its start)", "files/s",
                   len(rels) / seconds, seconds=seconds, files=len(rels),
                   mib_s=ds.small_bytes / MiB / seconds, summary=done.stdout.strip(), vs=f"{w}.boto3")
        with run.tiered(run.fresh_cache("packed")).start() as m:
            row = run.measure(m, w, "packed", "tieredfs cold, packed (S3, incl. listings, index)",
                              "files/s", lambda: files_per_s(m.path, rels), vs=f"{w}.cold")
        with run.tiered(run.fresh_cache("packed_index"), "--listing-from-index").start() as m:
            listed = run.measure(m, w, "packed_index", "tieredfs cold, packed, --listing-from-index "
                                 "(no LIST below the packed prefix)", "files/s",
                                 lambda: files_per_s(m.path, rels), vs=f"{w}.cold")
        for r in (row, listed, *(r for r in run.rows if r["id"] == f"{w}.cold")):
            r["gets_per_1000_files"] = r["daemon"]["s3_get"] * 1000 / len(rels)
    finally:
        _unpack(run.s3_url)


def _unpack(url: str) -> None:
    s3 = client(url)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{_PREFIX}/.tieredfs/")
    for page in pages:
        if page.get("Contents"):
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": o["Key"]} for o in page["Contents"]]})
