"""The S3 ceiling: what plain boto3 gets from the same endpoint, measured in the same run.

Sequential: the whole object in ranged GETs from N threads, for a few N and range sizes;
the best is the reference row. Small files: one GET per file from 8 threads. First byte:
one 4 KiB ranged GET on a warm connection.
"""

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .cpu import CpuSampler
from .dataset import BUCKET, client


def ranged_read(url: str, key: str, size: int, threads: int, chunk: int,
                server_pid: int | None = None) -> tuple[int, float, dict]:
    """(bytes, seconds, CPU) to GET the whole object in `chunk`-sized ranges from `threads`
    threads."""
    s3 = client(url, threads)
    s3.head_object(Bucket=BUCKET, Key=key)  # opens a connection outside the timing
    starts = list(range(0, size, chunk))
    lock = threading.Lock()
    got = [0]

    def one(start: int) -> None:
        end = min(size, start + chunk) - 1
        body = s3.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end}")["Body"]
        n = len(body.read())
        with lock:
            got[0] += n

    with CpuSampler(bench=os.getpid(), server=server_pid) as cpu:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, starts))
        seconds = time.perf_counter() - t0
    return got[0], seconds, cpu.result


def best_ranged_read(url: str, key: str, size: int, grid: list[tuple[int, int]],
                     server_pid: int | None = None) -> dict:
    trials = []
    for threads, chunk in grid:
        n, seconds, cpu = ranged_read(url, key, size, threads, chunk, server_pid)
        trials.append({"threads": threads, "chunk": chunk, "bytes": n, "seconds": seconds,
                       "mib_s": n / (1 << 20) / seconds, "cpu": cpu})
    best = max(trials, key=lambda t: t["mib_s"])
    return {**best, "trials": trials}


def small_gets(url: str, keys: list[str], threads: int) -> tuple[int, float]:
    s3 = client(url, threads)
    s3.head_object(Bucket=BUCKET, Key=keys[0])

    def one(key: str) -> int:
        return len(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(one, keys))
    return n, time.perf_counter() - t0


def first_byte_ms(url: str, keys: list[str]) -> float:
    """Median latency of a 4 KiB ranged GET, connection already open."""
    s3 = client(url, 1)
    s3.head_object(Bucket=BUCKET, Key=keys[0])
    times = []
    for key in keys:
        t0 = time.perf_counter()
        s3.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-4095")["Body"].read()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
