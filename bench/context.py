"""What one bench run shares: its mode (sizes), paths, endpoint, dataset, and the rows.

Every tieredfs row also carries what the daemon did for it: S3 requests by type and bytes
(the daemon's own counters, and the server's when it can count), peak RSS of the daemon,
hits per tier, and (fio rows) where the CPU went while fio read (bench/cpu.py).
"""

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .cpu import watching
from .dataset import BUCKET, Dataset
from .mounts import TieredMount, drop_tree_cache
from .servers import Endpoint

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@dataclass(frozen=True)
class Mode:
    name: str
    big: int                # bytes of the large file
    multi: int              # bytes of each of the four files of the multi-reader job
    small_files: int
    fio_runtime: int        # seconds per random-read run
    repeats: int            # fast rows: best of this many
    boto_grid: tuple        # (threads, range size) tried for the S3 ceiling; 4 x 16 MiB is
                            # the daemon's own request size and readahead budget
    ttfb_files: int
    restart_blocks: int     # cached blocks for the restart row (0: not run)
    bucket_objects: int     # objects in the large-bucket mount row (0: not run)


MODES = {
    "tiny": Mode("tiny", 16 * MiB, 4 * MiB, 60, 1, 1, ((1, MiB), (4, MiB)), 4, 0, 0),
    "quick": Mode("quick", 256 * MiB, 64 * MiB, 2000, 4, 3,
                  ((1, MiB), (4, MiB), (16, MiB), (4, 8 * MiB), (16, 8 * MiB), (4, 16 * MiB)),
                  20, 0, 0),
    "full": Mode("full", GiB, 256 * MiB, 5000, 15, 3,
                 ((1, MiB), (4, MiB), (8, MiB), (16, MiB), (32, MiB), (4, 8 * MiB),
                  (16, 8 * MiB), (32, 8 * MiB), (4, 16 * MiB)), 50, 100_000, 100_000),
}


class Run:
    def __init__(self, mode: Mode, workdir: Path, endpoint: Endpoint, s3_url: str,
                 dataset: Dataset, block_size: str):
        self.mode = mode
        self.workdir = workdir
        self.endpoint = endpoint
        self.s3_url = s3_url          # what the daemon and raw boto3 talk to (maybe the proxy)
        self.dataset = dataset
        self.block_size = block_size
        self.rows: list[dict] = []
        self._n = 0
        self.warm_caches: dict[str, Path] = {}

    # --- mounts --------------------------------------------------------------------

    def fresh_cache(self, name: str) -> Path:
        path = self.workdir / "caches" / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def tiered(self, cache: Path, *extra: str, bucket: str = BUCKET,
               endpoint_url: str | None = None) -> TieredMount:
        self._n += 1
        return TieredMount(f"s3://{bucket}", self.workdir / "mnt" / f"t{self._n}",
                           endpoint_url or self.s3_url,
                           cache, self.workdir / "logs" / f"daemon{self._n}.log",
                           ["--block-size", self.block_size, *extra])

    def null_path(self) -> tuple[Path, Path]:
        self._n += 1
        return self.workdir / "mnt" / f"null{self._n}", self.workdir / "logs" / f"null{self._n}.log"

    def remount_tier1(self, cache: Path, *extra: str) -> TieredMount:
        """A new daemon on a filled cache whose files are not in the page cache."""
        drop_tree_cache(cache / "blocks")
        return self.tiered(cache, *extra).start()

    # --- rows ----------------------------------------------------------------------

    def record(self, workload: str, key: str, label: str, metric: str, value: float | None,
               details: dict | None = None, *, kind: str = "reference", **extra) -> dict:
        """A row measured without a daemon's counters (a reference, or a mount-ready time)."""
        return self._add({"workload": workload, "id": f"{workload}.{key}", "label": label,
                          "kind": kind, "metric": metric, "value": value, **(details or {}),
                          **extra})

    def measure(self, m: TieredMount, workload: str, key: str, label: str, metric: str, fn,
                **extra) -> dict:
        """Run fn() (returning (value, details)) on mount m; record the daemon's share."""
        return self._add(self._measured(m, workload, key, label, metric, fn, **extra))

    def measure_best(self, mounts, workload: str, key: str, label: str, metric: str, fn,
                     **extra) -> dict:
        """measure() on `repeats` new mounts (mounts() makes one, started); record the best,
        as the native rows are the best of `repeats` too."""
        rows = []
        for _ in range(self.mode.repeats):
            with mounts() as m:
                rows.append(self._measured(m, workload, key, label, metric, lambda: fn(m), **extra))
        best = max(rows, key=lambda r: r["value"])
        best["trials"] = [r["value"] for r in rows]
        return self._add(best)

    def _measured(self, m: TieredMount, workload: str, key: str, label: str, metric: str, fn,
                  **extra) -> dict:
        before, server_before = m.stats(), self.endpoint.counts()
        with watching(daemon=m.pid, server=self.endpoint.pid, bench=os.getpid()):
            value, details = fn()  # a fio run's details hold its CPU, these processes' too
        after, server_after = m.stats(), self.endpoint.counts()
        row = {"workload": workload, "id": f"{workload}.{key}", "label": label, "kind": "tieredfs",
               "metric": metric, "value": value, **details, **extra,
               "daemon": _daemon_share(before, after), "peak_rss_bytes": m.peak_rss_bytes()}
        if server_after is not None:
            row["server"] = {k: server_after.get(k, 0) - server_before.get(k, 0)
                             for k in ("GET", "HEAD", "LIST", "GET_BYTES")}
        return row

    def _add(self, row: dict) -> dict:
        row["at"] = time.time()
        self.rows.append(row)
        return row


def _daemon_share(before: dict, after: dict) -> dict:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
         if isinstance(after.get(k, 0), int)}
    local, s3 = d.get("chain.hits.local", 0), d.get("chain.hits.s3", 0)
    return {
        "s3_get": d.get("s3.requests.get", 0), "s3_head": d.get("s3.requests.head", 0),
        "s3_list": d.get("s3.requests.list", 0), "s3_bytes": d.get("s3.bytes", 0),
        "s3_retries": d.get("s3.retries", 0),
        "hits_local": local, "hits_s3": s3,
        "single_flight_joins": d.get("chain.single_flight_joins", 0),
        "local_hit_ratio": local / (local + s3) if local + s3 else None,
        "local_fill_bytes": d.get("local.fill_bytes", 0),
    }
