"""GETs/s and CPU per GET of each HTTP client: boto3 (threads) against awscrt.

    python -m bench.http_clients [--files 2000] [--big-mib 256] [--endpoint-url URL --bucket B]

Without --endpoint-url it starts `rclone serve s3` on 127.0.0.1 with the bench's dataset
(small files, and one big object for ranged GETs). CPU is this process's (user + system) over
the timed part only, so it is the client's cost per GET; the server's is not in it.

Two kinds of rows: the bare clients (boto3's get_object, awscrt's S3Client), and the S3
tier itself (`tier, boto3` / `tier, crt`: tieredfs's S3Backend.get_pieces with
--http-client boto3 or crt, with every check and the retry loop) for small whole-object GETs
and for large ranged GETs. The tier rows decide which client `--http-client auto` gives each
kind of GET (tiers/s3.py CRT_MAX_BYTES); docs/performance-notes.md has the numbers.
"""

import argparse
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from tieredfs.blocks import ObjectVersion
from tieredfs.stats import Counters
from tieredfs.tiers.s3 import S3Backend

from . import dataset
from .servers import ACCESS_KEY, SECRET_KEY, RcloneEndpoint, apply_credentials

MiB = 1 << 20


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def boto3_gets(url: str, bucket: str, keys: list[str], threads: int) -> dict:
    s3 = dataset.client(url, threads)
    s3.head_object(Bucket=bucket, Key=keys[0])  # a connection, outside the timing

    def one(key: str) -> int:
        return len(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    t0, c0 = time.perf_counter(), _cpu()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(one, keys))
    return _row(f"boto3, {threads} threads", n, len(keys), time.perf_counter() - t0, _cpu() - c0)


def crt_gets(url: str, bucket: str, keys: list[str], in_flight: int) -> dict:
    try:
        from awscrt import auth, http, io, s3
    except ImportError:
        return {"client": "awscrt", "skipped": "awscrt is not installed (pip install awscrt)"}
    elg = io.EventLoopGroup(2)
    bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
    creds = auth.AwsCredentialsProvider.new_static(ACCESS_KEY, SECRET_KEY)
    client = s3.S3Client(bootstrap=bootstrap, region="us-east-1", tls_mode=s3.S3RequestTlsMode.DISABLED,
                         signing_config=s3.create_default_s3_signing_config(
                             region="us-east-1", credential_provider=creds))
    host = urlparse(url).netloc
    slots = threading.BoundedSemaphore(in_flight)
    lock, got, errors = threading.Lock(), [0], []

    def get(key: str):
        slots.acquire()
        request = http.HttpRequest("GET", f"/{bucket}/{key}", http.HttpHeaders([("Host", host)]))

        def on_body(chunk, offset, **_):
            with lock:
                got[0] += len(chunk)

        def on_done(error=None, status_code=None, **_):
            if error is not None or status_code != 200:
                errors.append((key, status_code, error))
            slots.release()

        return client.make_request(type=s3.S3RequestType.GET_OBJECT, request=request,
                                   on_body=on_body, on_done=on_done)

    get(keys[0]).finished_future.result(30)
    got[0] = 0
    t0, c0 = time.perf_counter(), _cpu()
    requests = [get(key) for key in keys]
    for r in requests:
        r.finished_future.result(60)
    row = _row(f"awscrt S3Client, {in_flight} in flight", got[0], len(keys),
               time.perf_counter() - t0, _cpu() - c0)
    row["errors"] = len(errors)
    return row


def tier_gets(url: str, objs: list[ObjectVersion], client: str, threads: int, piece: int = 0) -> dict:
    """GETs through the S3 tier with --http-client `client`: each object whole (piece 0),
    else every `piece` bytes of each object as one ranged GET, `threads` at a time."""
    try:
        b = S3Backend(objs[0].bucket, endpoint_url=url, region=None, max_requests=threads,
                      connect_timeout=5, read_timeout=10, max_attempts=3, deadline=60,
                      counters=Counters("s3"), http_client=client)
    except Exception as e:  # awscrt not installed: the row says so
        return {"client": f"tier, {client}", "skipped": str(e)}
    gets = [(o, 0, o.size) for o in objs] if not piece else \
        [(o, pos, min(piece, o.size - pos)) for o in objs for pos in range(0, o.size, piece)]
    b.get_range(*gets[0])  # a connection, outside the timing

    def one(get) -> int:
        return len(b.get_pieces(get[0], get[1], [get[2]])[0])

    t0, c0 = time.perf_counter(), _cpu()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(one, gets))
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    b.close()
    what = f"{piece >> 10} KiB ranges" if piece else "whole objects"
    row = _row(f"tier, {client}, {what}, {threads} threads", n, len(gets), seconds, cpu)
    row.update(mib_per_s=round(n / MiB / seconds), cpu_ms_per_mib=round(cpu * 1000 / (n / MiB), 3))
    return row


def _objects(url: str, bucket: str, keys: list[str]) -> list[ObjectVersion]:
    s3 = dataset.client(url)
    heads = [s3.head_object(Bucket=bucket, Key=k) for k in keys]
    return [ObjectVersion(bucket, k, h["ETag"].strip('"'), h["ContentLength"]) for k, h in zip(keys, heads)]


def _row(client: str, nbytes: int, files: int, seconds: float, cpu: float) -> dict:
    return {"client": client, "files": files, "bytes": nbytes, "gets_per_s": round(files / seconds),
            "cpu_ms_per_get": round(cpu * 1000 / files, 3)}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--endpoint-url")
    p.add_argument("--bucket", default=dataset.BUCKET)
    p.add_argument("--big-mib", type=int, default=256, help="the object of the ranged-GET rows")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    apply_credentials()
    with tempfile.TemporaryDirectory(prefix="tieredfs-http-", dir="/var/tmp") as work:
        endpoint = None
        url = args.endpoint_url
        if url is None:
            endpoint = RcloneEndpoint(Path(work) / "s3").start()
            url = endpoint.url
            ds = dataset.generate(Path(work) / "native", args.big_mib * MiB, 1 << 20, args.files)
            dataset.publish(ds, url, endpoint.root)
            keys = [rel for rel, _ in ds.small]
        else:
            pages = dataset.client(url).get_paginator("list_objects_v2").paginate(Bucket=args.bucket)
            keys = [o["Key"] for page in pages for o in page.get("Contents", ())][:args.files]
        small, big = _objects(url, args.bucket, keys), _objects(url, args.bucket, ["big"])
        try:
            for _ in range(args.repeats):
                rows = [boto3_gets(url, args.bucket, keys, 8), crt_gets(url, args.bucket, keys, 32)]
                for client in ("boto3", "crt"):
                    rows.append(tier_gets(url, small, client, 16))
                    rows.append(tier_gets(url, big, client, 4, 16 * MiB))
                    rows.append(tier_gets(url, big, client, 8, 1 * MiB))
                    rows.append(tier_gets(url, big, client, 16, MiB // 4))
                for row in rows:
                    print(row, flush=True)
        finally:
            if endpoint is not None:
                endpoint.stop()


if __name__ == "__main__":
    main()
