"""The settings `tieredfs mount` takes as options, one table shared by the CLI and fstab.

Each key is a Config field; mount.tieredfs (fstab.py) accepts the same names as `-o key=value`.
"""

from pathlib import Path

import click

from .config import LOG_LEVELS

MOUNT_SETTINGS = {
    "endpoint_url": click.option("--endpoint-url", help="S3 endpoint, e.g. http://127.0.0.1:9000"),
    "region": click.option("--region"),
    "cache_dir": click.option("--cache-dir", type=click.Path(path_type=Path),
                              help="local block cache (default ~/.cache/tieredfs/BUCKET)"),
    "cache_size": click.option("--cache-size", help="hard cap, bytes (20G) or % of the cache disk"),
    "cache_min_free": click.option("--cache-min-free", help="keep this much of the cache disk free"),
    "block_size": click.option("--block-size", help="block size, a power of two (default 1M)"),
    "list_ttl": click.option("--list-ttl", type=float, help="seconds a directory listing is trusted"),
    "s3_max_requests": click.option("--s3-max-requests", type=int, help="concurrent S3 requests"),
    "read_deadline": click.option("--read-deadline", type=float,
                                  help="seconds before a read that S3 cannot serve fails with EIO"),
    "s3_connect_timeout": click.option("--s3-connect-timeout", type=float,
                                       help="seconds to open a connection to S3 (per attempt)"),
    "s3_read_timeout": click.option("--s3-read-timeout", type=float,
                                    help="seconds S3 may stay silent mid-request before a retry"),
    "s3_max_attempts": click.option("--s3-max-attempts", type=int,
                                    help="attempts per S3 request within the read deadline"),
    "readahead_max": click.option("--readahead-max", help="largest readahead window per file"),
    "readahead_budget": click.option("--readahead-budget", help="readahead memory for all files"),
    "request_size": click.option("--request-size", help="bytes per prefetch GET (default 16M)"),
    "small_file_threshold": click.option("--small-file-threshold",
                                         help="objects up to this size are fetched whole (default 1M)"),
    "kernel_readahead": click.option("--kernel-readahead",
                                     help="the kernel's readahead on the mount, 0 = leave (default 1M)"),
    "dir_prefetch": click.option("--dir-prefetch", type=int,
                                 help="small files fetched ahead of an in-order directory walk (0: off)"),
    "list_tree_keys": click.option("--list-tree-keys", type=int,
                                   help="a tree of at most this many keys is listed flat when first "
                                        "looked into (default 5000; 0: off)"),
    "cache_open_files": click.option("--cache-open-files", type=int,
                                     help="tier-1 files kept open between reads (default 1024)"),
    "cache_write_queue": click.option("--cache-write-queue",
                                      help="fetched blocks waiting for the cache disk (default 32M)"),
    "cache_fill_wait": click.option("--cache-fill-wait", type=float,
                                    help="seconds a read may wait for a slow cache disk (0: never)"),
    "pack_readahead": click.option("--pack-readahead",
                                   help="pack bytes fetched past a packed file on open (default 16M)"),
    "listing_from_index": click.option("--listing-from-index/--no-listing-from-index", default=None,
                                       help="list packed prefixes from their index, without LIST "
                                            "(objects added since the pack are not seen)"),
    # The shared directory tier (docs/shared-tier.md).
    "shared_dir": click.option("--shared-dir", type=click.Path(path_type=Path),
                               help="block cache directory shared by the cluster's nodes (NFS...)"),
    "shared_namespace": click.option("--shared-namespace", help="tenant in the shared dir (default: bucket)"),
    "shared_quota": click.option("--shared-quota", help="bytes the namespace may use (default 100G)"),
    "shared_mode": click.option("--shared-mode", help="octal mode of files in the shared dir (664)"),
    "shared_group": click.option("--shared-group", help="group of files in the shared dir"),
    "shared_timeout": click.option("--shared-timeout", type=float,
                                   help="seconds a shared-dir call may take before it is bypassed (5)"),
    "shared_lease_wait": click.option("--shared-lease-wait", type=float,
                                      help="seconds to wait for another node's fetch (5; 0: no leases)"),
    "shared_threads": click.option("--shared-threads", type=int, help="threads for the shared dir (8)"),
    "shared_publish_queue": click.option("--shared-publish-queue",
                                         help="blocks waiting to be published (default 64M)"),
    "metrics_addr": click.option("--metrics-addr", help="serve Prometheus metrics on HOST:PORT (off by default)"),
    "record": click.option("--record", type=click.Path(path_type=Path),
                           help="write the blocks reads ask for to FILE (tieredfs warmup --replay)"),
    "uid": click.option("--uid", type=int, help="owner shown for files (default: you)"),
    "gid": click.option("--gid", type=int),
    "log_file": click.option("--log-file", type=click.Path(path_type=Path)),
    # Issue 18 (hardening).
    "file_mode": click.option("--file-mode", help="permission bits of files in the mount, octal (default 0444)"),
    "dir_mode": click.option("--dir-mode", help="permission bits of directories, octal (default 0555)"),
    "addressing_style": click.option("--addressing-style", type=click.Choice(["auto", "path", "virtual"]),
                                     help="S3 URLs: bucket in the path or in the host (default auto)"),
    "etag_md5": click.option("--etag-md5/--no-etag-md5", default=None,
                             help="check whole-object GETs against single-part ETags (default on)"),
    # Issue 19: the HTTP client of GETs (tiers/s3.py, docs/s3.md).
    "http_client": click.option("--http-client", type=click.Choice(["auto", "boto3", "crt"]),
                                help="client of S3 GETs: auto (awscrt where it wins, if installed)"),
    "crt_threads": click.option("--crt-threads", type=int, help="awscrt's event-loop threads (default 1)"),
    "cache_index_size": click.option("--cache-index-size",
                                     help="the cache index's LMDB map (default: sized from --cache-size)"),
    # Event-loop and kernel queue limits (docs/reliability.md) and idle readahead (docs/readahead.md).
    "fuse_max_requests": click.option("--fuse-max-requests", type=int,
                                      help="FUSE requests the daemon works on at once (default 1024)"),
    "fuse_max_background": click.option("--fuse-max-background", type=int,
                                        help="kernel's queue of background requests, raised at mount (256)"),
    "readahead_idle": click.option("--readahead-idle", type=float,
                                   help="seconds before an idle file's prefetched data is dropped (10)"),
    "persist_listings": click.option("--persist-listings/--no-persist-listings", default=None,
                                     help="keep directory listings in the cache dir across restarts (on)"),
    "listings_size": click.option("--listings-size", help="disk bound of the kept listings (default 64M)"),
    "log_level": click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
                              help="least severe events logged (default info); SIGHUP re-reads it"),
}


def mount_settings(fn):
    for opt in reversed(MOUNT_SETTINGS.values()):
        fn = opt(fn)
    return fn
