"""The dataset: written once to a local directory (the native reference copy), then put in
the bucket (copied into rclone's directory, or uploaded through boto3).

  big                one large file: sequential, random 4 KiB and first-byte reads
  multi/part0..3     four files for the four-reader sequential job
  small/dNN/dNN/fN   a few thousand 4-64 KiB files in nested directories
"""

import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.config

BUCKET = "tieredfs-bench"
_CHUNK = 1 << 20


@dataclass
class Dataset:
    root: Path                     # the native copy
    big_size: int
    multi_size: int
    small: list[tuple[str, int]] = field(default_factory=list)  # (relative path, size)

    @property
    def small_bytes(self) -> int:
        return sum(size for _, size in self.small)

    def keys(self) -> list[str]:
        return ["big", *(f"multi/part{i}" for i in range(4)), *(p for p, _ in self.small)]


def generate(root: Path, big_size: int, multi_size: int, small_files: int, seed: int = 5) -> Dataset:
    rng = random.Random(seed)
    ds = Dataset(root, big_size, multi_size)
    _random_file(root / "big", big_size, rng)
    for i in range(4):
        _random_file(root / "multi" / f"part{i}", multi_size, rng)
    fanout = max(2, round(small_files ** (1 / 3)))
    for n in range(small_files):
        rel = f"small/d{n % fanout:02d}/d{n // fanout % fanout:02d}/f{n:05d}"
        size = rng.randrange(4 << 10, (64 << 10) + 1)
        _random_file(root / rel, size, rng)
        ds.small.append((rel, size))
    os.sync()  # posix_fadvise(DONTNEED) cannot drop dirty pages: "cold" needs them written
    return ds


def _random_file(path: Path, size: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for pos in range(0, size, _CHUNK):
            f.write(rng.randbytes(min(_CHUNK, size - pos)))


def client(url: str, threads: int = 16):
    cfg = botocore.config.Config(max_pool_connections=threads, region_name="us-east-1",
                                 retries={"total_max_attempts": 3}, s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=url, config=cfg)


def publish(ds: Dataset, url: str, served_root: Path | None) -> None:
    """Make the bucket hold the dataset: a file copy for rclone's directory, else uploads."""
    if served_root is not None:
        shutil.copytree(ds.root, served_root / BUCKET, dirs_exist_ok=True)
        os.sync()
    else:
        _upload(ds, url)
    _prime(url)


def _upload(ds: Dataset, url: str) -> None:
    s3 = client(url)
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3.upload_file(str(ds.root / key), BUCKET, key), ds.keys()))


def _prime(url: str) -> int:
    """List everything once: rclone computes (and keeps) each file's MD5 ETag on first listing,
    which must not be charged to the first measured read."""
    pages = client(url).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return sum(len(page.get("Contents", ())) for page in pages)


def read_tree(root: Path, rels: list[str], threads: int) -> int:
    """Read each file whole with `threads` readers; the bytes read."""

    def one(rel: str) -> int:
        fd = os.open(root / rel, os.O_RDONLY)
        try:
            n = 0
            while chunk := os.read(fd, 1 << 17):
                n += len(chunk)
            return n
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, rels))

