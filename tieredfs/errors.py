"""Every exception tieredfs raises on purpose, and its errno at the FUSE edge.

The CLI turns these into one-line messages; fuse_ops turns them into errno.
Anything else escaping to either edge is a bug and is reported as EIO.
"""

import errno


class TieredError(Exception):
    """Base of all expected failures. `str()` is a message a user can act on."""

    errno = errno.EIO


# --- start-up and configuration ------------------------------------------------


class ConfigError(TieredError):
    """A setting or command-line value is invalid."""

    errno = errno.EINVAL


class MountError(TieredError):
    """The mount point or FUSE itself cannot be used."""


class BucketMissing(TieredError):
    errno = errno.ENOENT


class CredentialsRefused(TieredError):
    errno = errno.EACCES


class EndpointUnreachable(TieredError):
    pass


# --- data path ------------------------------------------------------------------


class ObjectMissing(TieredError):
    """The object is truly absent on S3 (404), not throttled or unreachable."""

    errno = errno.ENOENT


class ObjectChanged(TieredError):
    """The object's ETag is no longer the one pinned at open(); mixing versions is refused."""

    errno = errno.EIO


class BackendUnavailable(TieredError):
    """S3 did not give a correct answer within the retry budget and deadline."""

    errno = errno.EIO


class DataMismatch(TieredError):
    """Bytes read through a mount differ from their source (the demo's own check)."""


class CacheCorrupt(TieredError):
    """A cached block failed verification; callers treat it as a miss."""


class CacheError(TieredError):
    """The cache directory cannot be used (locked, unwritable, bad index)."""


class CacheIndexFull(CacheError):
    """The index's LMDB map has no room left: the block is not cached."""


class CacheLocked(CacheError):
    pass


class CacheFormatChanged(CacheError):
    """The index was written by a version of tieredfs that laid the cache out differently."""


class UnknownHandle(TieredError):
    """A file handle the filesystem never gave out, or has released."""

    errno = errno.EBADF


# --- packs (docs/packs.md) ---------------------------------------------------------


class PackIndexUnusable(TieredError):
    """A pack index or its pointer cannot be read (unknown format, damaged): its packs are
    not used, and every file is read from its own object."""


class PackWorkFailed(TieredError):
    """`tieredfs pack` cannot write its work files (a full or read-only TMPDIR)."""


class PackVerifyFailed(TieredError):
    """`tieredfs pack --verify` found packed bytes that differ from their source."""


class ReadOnly(TieredError):
    errno = errno.EROFS


class ReplayRefused(TieredError):
    """A replay file that does not fit the mount: another bucket, another version, damaged."""


def errno_of(exc: BaseException) -> int:
    """The errno a reader sees for `exc`; unexpected exceptions become EIO."""
    if isinstance(exc, TieredError):
        return exc.errno
    return errno.EIO


def expected(exc: BaseException) -> TieredError | None:
    """The TieredError that `exc` is, or that a trio nursery wrapped it in a group of only
    such errors (a failure inside the mount's tasks); None for anything else (a bug)."""
    if isinstance(exc, BaseExceptionGroup):
        ours, rest = exc.split(TieredError)
        if rest is not None or ours is None:
            return None
        exc = ours
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
    return exc if isinstance(exc, TieredError) else None
