"""One validated settings object, fed by CLI options and an optional TOML file.

Precedence: defaults < config file < command line. Everything is checked once in
`Config.validate()`; code further down trusts the values it is given.
"""

import dataclasses
import logging
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)?\s*$", re.IGNORECASE)
_ADDRESSING_STYLES = ("auto", "path", "virtual")
_SIZE_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB, "p": 1024**5}


def parse_size(text: str | int, what: str = "size") -> int:
    """'64M', '1GiB', '1.5g', 4096 -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"{what}: cannot read {text!r} as a size (examples: 4096, 64M, 20G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix/'); the prefix is a directory."""
    if not url.startswith("s3://"):
        raise ConfigError(f"bad URL {url!r}: expected s3://BUCKET[/PREFIX]")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    # Only what would break a path (the cache dir is named after the bucket) or a request
    # line is refused: S3-compatible stores and old buckets have names that AWS's rules of
    # today reject, and the server is the judge of its own names.
    if not bucket or bucket in (".", "..") or any(ch < " " or ch in "\\\x7f" for ch in bucket):
        raise ConfigError(f"bad URL {url!r}: {bucket!r} is not a usable bucket name")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def default_cache_dir(bucket: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tieredfs" / bucket


@dataclass
class Config:
    bucket: str
    prefix: str = ""
    mountpoint: Path = Path(".")
    endpoint_url: str | None = None
    region: str | None = None
    cache_dir: Path | None = None

    # Blocks and caching.
    block_size: int = 1 * MiB
    cache_size: str = "10G"  # bytes or a percentage of the cache filesystem, e.g. "20%"
    cache_min_free: int = 1 * GiB
    cache_open_files: int = 1024  # tier-1 files (one per object) kept open between reads
    list_ttl: float = 60.0

    # S3 access.
    s3_max_requests: int = 16
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 10.0
    s3_max_attempts: int = 6
    read_deadline: float = 60.0  # a FUSE read gets its bytes or EIO within this many seconds

    # Readahead (docs/readahead.md).
    readahead_max: int = 64 * MiB  # largest window one file keeps fetched ahead of its reader
    readahead_budget: int = 64 * MiB  # prefetch bytes in flight or buffered, all files together
    request_size: int = 16 * MiB  # bytes per prefetch GET (several blocks in one request)
    small_file_threshold: int = 1 * MiB  # objects up to this size are fetched whole on first read
    # The kernel's own readahead on the mount (needs root). 1 MiB, not more: FUSE drops the
    # async part of a readahead while 9 requests wait (docs/readahead.md, "The kernel's side").
    kernel_readahead: int = 1 * MiB
    dir_prefetch: int = 16  # small files fetched ahead when a directory is read in order; 0 = off
    list_tree_keys: int = 5000  # a tree of at most this many keys is listed flat at first look; 0 = off
    cache_write_queue: int = 32 * MiB  # fetched blocks waiting to be written to the cache
    cache_fill_wait: float = 2.0  # seconds without any cache write finishing = a stalled disk

    # Small-file packs (docs/packs.md): pack bytes fetched past a packed file when it is
    # opened, so a directory walk finds its next files in tier 1.
    pack_readahead: int = 16 * MiB  # one request_size: a walk costs one GET per 16 MiB
    # Issue 21: list packed prefixes from their index, with no LIST (new objects unseen).
    listing_from_index: bool = False

    # Shared directory tier (tiers/shared.py, docs/shared-tier.md); off without shared_dir.
    shared_dir: Path | None = None
    shared_namespace: str | None = None  # default: the bucket
    shared_quota: int = 100 * GiB  # per namespace, kept by the collector (evicts LRU blocks)
    shared_mode: str = "664"  # octal permissions of the files it creates (dirs get x too)
    shared_group: str | None = None  # group (name or number) of the files it creates
    shared_timeout: float = 5.0  # seconds any call on the shared dir may take, then bypassed
    shared_lease_wait: float = 5.0  # seconds to wait for another node's fetch; 0 = no leases
    shared_threads: int = 8  # worker threads for the shared dir (its own pool)
    # Fetched blocks waiting to be published, in memory; beyond it up to one per 4 KiB of it
    # more wait by address and are read back from tier 1 when their turn comes.
    shared_publish_queue: int = 64 * MiB
    # Seeing and steering the cache (issue 23: docs/metrics.md, docs/warmup.md).
    metrics_addr: str | None = None  # HOST:PORT serving Prometheus metrics; off when unset
    record: Path | None = None  # write the blocks that reads ask for to this file, in order

    # Mount.
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    fuse_options: list[str] = field(default_factory=list)
    max_threads: int = 32  # worker threads for the cache disk
    # FUSE requests served at once (issue 18, head-of-line blocking). A request waiting on S3
    # costs a trio task, not a thread; S3 is bounded by s3_max_requests. Kept high so that
    # reads the cache can serve never queue behind reads waiting on S3.
    fuse_max_requests: int = 1024
    # The kernel's own bound on background requests (O_DIRECT reads, readahead) at the daemon,
    # raised from its default of 12 when root (tieredfs/fusectl.py).
    fuse_max_background: int = 256
    # Issue 18: an open file not read for this many seconds gives back its readahead budget.
    readahead_idle: float = 10.0
    log_file: Path | None = None
    debug: bool = False

    # Running as a service (docs/systemd.md). A SIGHUP may change the log level. A config
    # file may also hold the S3 URL (`url = "s3://..."`, see build_config) and `mountpoint`,
    # so that a unit needs only the file.
    log_level: str = "info"

    # Issue 18 (hardening): what the mount shows, how S3 is addressed, the index's map.
    file_mode: int = 0o444  # permission bits of every file in the mount
    dir_mode: int = 0o555  # ...and of every directory
    addressing_style: str = "auto"  # auto, path or virtual (tiers/s3.py addressing_style)
    cache_index_size: int = 0  # the LMDB map of the cache index; 0: sized from --cache-size
    etag_md5: bool = True  # a single-part object's ETag is the MD5 of its bytes (checked)

    # Issue 19 (HTTP client): which client serves GETs (auto: awscrt for the GETs it was
    # measured to win, when installed; tiers/s3.py) and awscrt's event-loop threads.
    http_client: str = "auto"
    crt_threads: int = 1

    # Issue 19: directory listings kept in the cache dir, so a restarted daemon serves cached
    # files without listing S3 first (listings_store.py, docs/namespace.md).
    persist_listings: bool = True
    listings_size: int = 64 * MiB  # the kept listings' bound on disk (oldest go first)

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir or default_cache_dir(self.bucket)

    def cache_size_bytes(self, fs_total: int) -> int:
        """The hard cache cap; a percentage is taken of the cache filesystem's size."""
        text = str(self.cache_size).strip()
        if text.endswith("%"):
            return int(fs_total * float(text[:-1]) / 100)
        return parse_size(text, "cache-size")

    def validate(self) -> "Config":
        bs = self.block_size
        if bs < 4 * KiB or bs > 64 * MiB or bs & (bs - 1):
            raise ConfigError(f"block-size {bs} must be a power of two between 4K and 64M")
        text = str(self.cache_size).strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                raise ConfigError(f"cache-size {text!r}: bad percentage") from None
            if not 0 < pct <= 100:
                raise ConfigError(f"cache-size {text!r}: percentage must be in (0, 100]")
        elif self.cache_size_bytes(0) < 16 * bs:
            raise ConfigError(f"cache-size {text!r} is smaller than 16 blocks of {bs} bytes")
        for name in ("s3_max_requests", "s3_max_attempts", "max_threads", "cache_open_files",
                     "fuse_max_requests", "fuse_max_background"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.dir_prefetch <= 256:
            raise ConfigError("dir-prefetch must be between 0 and 256 files")
        if not 0 <= self.list_tree_keys <= 100_000:
            raise ConfigError("list-tree-keys must be between 0 and 100000 keys")
        for name in ("s3_connect_timeout", "s3_read_timeout", "read_deadline", "list_ttl",
                     "readahead_idle"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive")
        if not 0 <= self.cache_fill_wait <= 60:
            raise ConfigError("cache-fill-wait must be between 0 and 60 seconds")
        for name in ("uid", "gid"):
            if not 0 <= getattr(self, name) < 2**32 - 1:
                raise ConfigError(f"{name} {getattr(self, name)} is not a valid id (0 to 4294967294)")
        if self.readahead_budget < self.block_size:
            raise ConfigError("readahead-budget must hold at least one block")
        if self.readahead_max < self.block_size:
            raise ConfigError("readahead-max must be at least one block")
        if self.request_size < self.block_size:
            raise ConfigError("request-size must be at least one block")
        if self.endpoint_url and not re.match(r"^https?://[^/\s]+", self.endpoint_url):
            raise ConfigError(f"endpoint-url {self.endpoint_url!r} must look like http(s)://HOST[:PORT]")
        if self.metrics_addr is not None and not _ADDR_RE.match(self.metrics_addr):
            raise ConfigError(f"metrics-addr {self.metrics_addr!r} must be HOST:PORT, e.g. 127.0.0.1:9464")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log-level {self.log_level!r} must be one of {', '.join(LOG_LEVELS)}")
        self._validate_together()
        self._validate_hardening()
        if self.http_client not in ("auto", "boto3", "crt"):
            raise ConfigError(f"http-client {self.http_client!r} must be auto, boto3 or crt")
        if not 1 <= self.crt_threads <= 16:
            raise ConfigError(f"crt-threads {self.crt_threads} must be between 1 and 16")
        for opt in self.fuse_options:
            if opt not in _ALLOWED_FUSE_OPTIONS and not opt.startswith("fsname="):
                allowed = ", ".join(sorted(_ALLOWED_FUSE_OPTIONS))
                raise ConfigError(f"mount option {opt!r} is not supported (supported: {allowed}, fsname=...)")
        if self.shared_dir is not None:
            self._validate_shared()
        return self

    def _validate_together(self) -> None:
        """Values fine alone that cannot work together: the option to change is named."""
        bs = self.block_size
        # Not checked: request-size or readahead-max above readahead-budget (clamped to it).
        if self.cache_write_queue < bs:
            raise ConfigError(f"cache-write-queue {self.cache_write_queue} cannot hold one block of "
                              f"{bs} bytes, so nothing would be cached: raise --cache-write-queue "
                              "to at least --block-size")
        if self.small_file_threshold > self.readahead_budget:
            raise ConfigError(f"small-file-threshold {self.small_file_threshold} is larger than "
                              f"readahead-budget {self.readahead_budget}: a small file is fetched "
                              "whole within the budget (lower --small-file-threshold or raise --readahead-budget)")

    def _validate_hardening(self) -> None:
        for name in ("file_mode", "dir_mode"):
            if not 0 <= getattr(self, name) <= 0o7777:
                raise ConfigError(f"{name.replace('_', '-')} {getattr(self, name):o} is not a mode "
                                  "(octal, e.g. 0444)")
        if self.addressing_style not in _ADDRESSING_STYLES:
            raise ConfigError(f"addressing-style {self.addressing_style!r} must be one of "
                              f"{', '.join(_ADDRESSING_STYLES)}")
        if self.cache_index_size and self.cache_index_size < 64 * KiB:
            raise ConfigError("cache-index-size must be 0 (sized from cache-size) or at least 64K")
        if self.listings_size < 64 * KiB:
            raise ConfigError("listings-size must be at least 64K")

    def _validate_shared(self) -> None:
        from .tiers.shared_format import check_namespace

        check_namespace(self.effective_shared_namespace)
        self.shared_perms()
        if self.shared_quota < 16 * self.block_size:
            raise ConfigError(f"shared-quota must hold at least 16 blocks of {self.block_size} bytes")
        if self.shared_timeout <= 0 or not 0 <= self.shared_lease_wait <= 300:
            raise ConfigError("shared-timeout must be positive, shared-lease-wait 0 to 300 seconds")
        if self.shared_threads < 1 or self.shared_publish_queue < self.block_size:
            raise ConfigError("shared-threads must be at least 1, shared-publish-queue one block")

    @property
    def effective_shared_namespace(self) -> str:
        return self.shared_namespace or self.bucket

    def shared_perms(self):
        """How the shared tier creates files: --shared-mode and --shared-group, checked."""
        from .tiers.shared_format import Perms

        return Perms(mode=self._shared_mode_bits(), gid=self._shared_gid())

    def _shared_mode_bits(self) -> int:
        try:
            mode = int(str(self.shared_mode), 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o777 or not mode & 0o600 == 0o600:
            raise ConfigError(f"shared-mode {self.shared_mode!r}: octal permissions the owner "
                              "can read and write, e.g. 664 or 660")
        return mode

    def _shared_gid(self) -> int | None:
        if self.shared_group is None:
            return None
        import grp

        try:
            return grp.getgrnam(self.shared_group).gr_gid
        except KeyError:
            if self.shared_group.isdigit():
                return int(self.shared_group)
            raise ConfigError(f"shared-group {self.shared_group!r}: no such group") from None


LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level_of(config: Config) -> int:
    """--debug is the older spelling of --log-level debug."""
    return logging.DEBUG if config.debug else getattr(logging, config.log_level.upper())


_ADDR_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[\w.\-]+):([1-9]\d{0,4})$")
def parse_mode(text: str | int, what: str = "mode") -> int:
    """'0640', '640', 0o640 -> 0o640 (octal, as chmod takes it)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        return int(str(text).strip(), 8)
    except ValueError:
        raise ConfigError(f"{what}: cannot read {text!r} as an octal mode (e.g. 0444)") from None


_ALLOWED_FUSE_OPTIONS = {"allow_other", "allow_root", "default_permissions", "ro", "noatime", "nodev", "nosuid"}
_SIZE_FIELDS = {"block_size", "cache_min_free", "readahead_max", "readahead_budget", "request_size",
                "small_file_threshold", "kernel_readahead", "cache_write_queue", "cache_index_size",
                "pack_readahead", "shared_quota", "shared_publish_queue", "listings_size"}
_MODE_FIELDS = {"file_mode", "dir_mode"}


def load_toml(path: Path) -> dict:
    """Read a TOML config file into Config field values (keys may use - or _)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return normalize(raw, source=str(path))


def normalize(values: dict, source: str = "options") -> dict:
    """Map user-facing names and types onto Config fields; unknown keys are errors."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        name = key.replace("-", "_")
        if name == "url":
            if not isinstance(value, str):
                raise ConfigError(f"{source}: url = {value!r} must be a string like s3://BUCKET/PREFIX")
            out["url"] = value
            continue
        if name not in _KINDS or name in ("bucket", "prefix"):  # those come from the URL
            raise ConfigError(f"{source}: unknown setting {key!r}")
        if name in _MODE_FIELDS:
            out[name] = parse_mode(value, key)
        else:
            out[name] = parse_size(value, key) if name in _SIZE_FIELDS else _typed(name, value, key, source)
    return out


def _kind(annotation) -> type:
    """int, float, bool, str, Path or list: what a field holds, ignoring `| None`."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


_KINDS = {f.name: _kind(f.type) for f in dataclasses.fields(Config)}


def _typed(name: str, value, key: str, source: str):
    """A TOML file's values arrive with TOML's types; a wrong one is named, not crashed on."""
    kind = _KINDS[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {int: number and isinstance(value, int), float: number, bool: isinstance(value, bool),
          str: isinstance(value, str) or number,  # cache-size = 1073741824 is fine
          Path: isinstance(value, (str, Path)),
          list: isinstance(value, list) and all(isinstance(v, str) for v in value)}[kind]
    if not ok:
        what = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
                Path: "a path", list: "a list of strings"}[kind]
        raise ConfigError(f"{source}: {key} = {value!r} must be {what}")
    if kind is Path:
        return Path(value).expanduser()
    return float(value) if kind is float else str(value) if kind is str else value


def build_config(url: str | None, file_values: dict, cli_values: dict) -> Config:
    merged = {**file_values, **cli_values}
    url = url or merged.pop("url", None)  # the command line's URL wins over the file's
    merged.pop("url", None)
    if not url:
        raise ConfigError("no S3 URL: give s3://BUCKET[/PREFIX], or url = \"s3://...\" in the config file")
    bucket, prefix = parse_s3_url(url)
    try:
        return Config(bucket=bucket, prefix=prefix, **merged).validate()
    except TypeError as e:
        raise ConfigError(str(e)) from None
