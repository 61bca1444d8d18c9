"""The shared tier's on-disk format: where a namespace keeps its files, and what a block
file holds (docs/shared-tier.md has the same, for users).

Everything here is plain, blocking file I/O for worker threads; nothing here knows about
trio, timeouts or S3. A block file is self-describing, so any node verifies it alone:

    fixed header  <8s H H I Q Q>: magic b"TIEREDFS", version, flags (0), identity length,
                  data length, xxh3-64 of the data
    identity      JSON (sorted keys): bucket, key, etag, block_size, index, id
    header sum    xxh3-64 of the fixed header and the identity (8 bytes)
    data          the block's bytes

A block is published by writing a temp file in its final directory, fsync, then rename:
a reader on another node sees the whole old file, the whole new one, or none.
"""

import json
import os
import re
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import xxhash

from ..blocks import BlockRef
from ..errors import ConfigError

MAGIC = b"TIEREDFS"
VERSION = 1
_FIXED = struct.Struct("<8sHHIQQ")
_SUM = struct.Struct("<Q")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TEMP_PREFIX = ".tmp-"
MARKER = "tieredfs-shared.json"  # at the top of a shared dir: its format version


class BadBlock(Exception):
    """A block file that must not be served; `kind` is torn, stale, foreign or unreadable."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def check_namespace(name: str) -> str:
    if not _NAMESPACE_RE.match(name):
        raise ConfigError(f"shared namespace {name!r}: use 1-64 of A-Z a-z 0-9 . _ - "
                          "(not starting with . _ or -)")
    return name


def identity(ref: BlockRef) -> dict:
    o = ref.obj
    return {"bucket": o.bucket, "key": o.key, "etag": o.etag, "block_size": ref.block_size,
            "index": ref.index, "id": ref.id}


def encode_header(ref: BlockRef, data) -> bytes:
    ident = json.dumps(identity(ref), sort_keys=True, separators=(",", ":")).encode()
    fixed = _FIXED.pack(MAGIC, VERSION, 0, len(ident), len(data), xxhash.xxh3_64_intdigest(data))
    head = fixed + ident
    return head + _SUM.pack(xxhash.xxh3_64_intdigest(head))


def decode(raw, ref: BlockRef | None) -> tuple[dict, memoryview]:
    """(identity, data) of a whole block file's bytes, verified; against `ref` if given.
    Raises BadBlock: torn (short, bad sums), stale (another format version) or foreign
    (another block's identity, as from a swapped or misnamed file)."""
    view = memoryview(raw)
    if len(view) < _FIXED.size:
        raise BadBlock("torn", f"{len(view)} bytes, shorter than a header")
    magic, version, _, ident_len, data_len, data_sum = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise BadBlock("foreign", "not a tieredfs block file")
    if version != VERSION:
        raise BadBlock("stale", f"format version {version}, this node reads {VERSION}")
    head_end = _FIXED.size + ident_len
    if len(view) < head_end + _SUM.size:
        raise BadBlock("torn", "header cut short")
    if _SUM.unpack_from(view, head_end)[0] != xxhash.xxh3_64_intdigest(view[:head_end]):
        raise BadBlock("torn", "header checksum mismatch")
    ident = json.loads(bytes(view[_FIXED.size:head_end]))
    if ref is not None and ident != identity(ref):
        raise BadBlock("foreign", f"holds block {ident.get('id')}, not {ref.id}")
    data = view[head_end + _SUM.size:]
    if len(data) != data_len or (ref is not None and data_len != ref.length):
        raise BadBlock("torn", f"{len(data)} data bytes, header says {data_len}")
    if xxhash.xxh3_64_intdigest(data) != data_sum:
        raise BadBlock("torn", "data checksum mismatch")
    return ident, data


def node_name() -> str:
    """This process, as it names its journal and leases: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Perms:
    """How files are created, so that nodes running as different users can share."""

    mode: int = 0o664
    gid: int | None = None

    @property
    def dir_mode(self) -> int:
        # x wherever r, plus setgid so new files inherit the directory's group.
        return self.mode | ((self.mode & 0o444) >> 2) | (0o2000 if self.gid is not None else 0)

    def apply(self, fd: int) -> None:
        os.fchmod(fd, self.mode)  # not masked by the umask, unlike open()'s mode
        if self.gid is not None:
            os.fchown(fd, -1, self.gid)

    def makedirs(self, path: Path, top: Path) -> None:
        """Create `path` and its parents below `top`, which must exist: a share that has
        vanished (an NFS mount gone) is not re-created on the disk beneath it."""
        if path == top or path.is_dir():
            return
        self.makedirs(path.parent, top)
        try:
            os.mkdir(path, self.dir_mode)
        except FileExistsError:
            return
        os.chmod(path, self.dir_mode)
        if self.gid is not None:
            os.chown(path, -1, self.gid)


class Layout:
    """The paths of one namespace:

        DIR/tieredfs-shared.json            {"format": 1}
        DIR/<namespace>/blocks/<ab>/<id>     block files (ab: the id's first two hex digits)
        DIR/<namespace>/leases/<ab>/<id>     single-flight leases while a node fetches a block
        DIR/<namespace>/journal/<node>.<hour>   each node's append-only usage journal
        DIR/<namespace>/gc/                  the collector's lease and its summary (state.json)
    """

    def __init__(self, root: Path, namespace: str):
        self.root = Path(root)
        self.namespace = check_namespace(namespace)
        self.ns = self.root / namespace
        self.blocks = self.ns / "blocks"
        self.leases = self.ns / "leases"
        self.journal = self.ns / "journal"
        self.gc = self.ns / "gc"

    def block(self, block_id: str) -> Path:
        return self.blocks / block_id[:2] / block_id

    def lease(self, block_id: str) -> Path:
        return self.leases / block_id[:2] / block_id

    def fanout(self) -> list[str]:
        return [f"{i:02x}" for i in range(256)]

    def create(self, perms: Perms) -> None:
        """The marker and the namespace's top directories (fan-out dirs come on first use)."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if not marker.exists():
            write_atomic(marker, json.dumps({"format": VERSION}).encode(), perms)
        found = json.loads(marker.read_bytes()).get("format")
        if found != VERSION:
            raise ConfigError(f"shared dir {self.root} has format {found}; this tieredfs uses "
                              f"{VERSION} (use another --shared-dir or --shared-namespace)")
        for d in (self.blocks, self.leases, self.journal, self.gc):
            perms.makedirs(d, self.root)


def create_lease(path: Path, holder: str, ttl: float, perms: Perms) -> bool:
    """Create a lease file `<holder> <expiry>` with O_EXCL: False if one exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        perms.apply(fd)
        os.write(fd, f"{holder} {time.time() + ttl:.3f}\n".encode())
    finally:
        os.close(fd)
    return True


def lease_expiry(text: str | None, path: Path, ttl: float) -> float | None:
    """When a lease read as `text` ends; one its holder died writing is judged by its age.
    None: there is no lease."""
    if text is None:
        return None
    try:
        return float(text.split()[1])
    except (ValueError, IndexError):
        try:
            return path.stat().st_mtime + ttl
        except FileNotFoundError:
            return None


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def namespaces(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir()
                  if p.is_dir() and _NAMESPACE_RE.match(p.name) and (p / "blocks").is_dir())


def temp_name() -> str:
    return f"{TEMP_PREFIX}{node_name()}-{os.urandom(4).hex()}"


def write_atomic(path: Path, payload, perms: Perms, parts: tuple = ()) -> None:
    """Write `parts` then `payload` to a temp file beside `path`, fsync it, rename it over."""
    tmp = path.parent / temp_name()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            perms.apply(fd)
            for piece in (*parts, payload):
                _write_all(fd, piece)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _write_all(fd: int, payload) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
