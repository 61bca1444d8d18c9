"""The pyfuse3 edge (the only module that imports pyfuse3).

Each handler translates arguments, calls one FileSystem method and maps errors to
errno. No policy lives here.
"""

import errno
import functools
import logging
import stat

import pyfuse3

from . import stats
from .errors import ReadOnly, TieredError, UnknownHandle, errno_of
from .filesystem import FileSystem
from .namespace import Node

log = logging.getLogger(__name__)

STATS_XATTR, MOUNT_XATTR, ETAG_XATTR = (n.encode() for n in (stats.STATS_XATTR, stats.MOUNT_XATTR,
                                                               stats.ETAG_XATTR))


def _errors(fn):
    """Expected failures become their errno; anything else is a bug, logged once, EIO."""

    @functools.wraps(fn)
    async def wrapper(*args):
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except TieredError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except (NotADirectoryError, IsADirectoryError) as e:
            code = {NotADirectoryError: errno.ENOTDIR, IsADirectoryError: errno.EISDIR}[type(e)]
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("event=handler_bug op=%s", fn.__name__)
            raise pyfuse3.FUSEError(errno_of(Exception())) from None

    return wrapper


async def _refuse_write(self, *args, **kwargs):
    raise pyfuse3.FUSEError(ReadOnly.errno)


class FuseOps(pyfuse3.Operations):
    def __init__(self, fs: FileSystem, *, uid: int, gid: int, attr_timeout: float, block_size: int,
                 capacity: int, file_mode: int = 0o444, dir_mode: int = 0o555):
        super().__init__()
        self.fs = fs
        self.uid, self.gid = uid, gid
        self.file_mode, self.dir_mode = stat.S_IFREG | file_mode, stat.S_IFDIR | dir_mode
        self.attr_timeout = attr_timeout
        self.block_size = block_size
        self.capacity = capacity

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = self.dir_mode if node.is_dir else self.file_mode
        a.st_nlink = 2 if node.is_dir else 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_size = node.size
        a.st_blksize = self.block_size
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        a.entry_timeout = a.attr_timeout = self.attr_timeout
        return a

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        return self._attrs(await self.fs.lookup(parent_inode, name))

    @_errors
    async def getattr(self, inode, ctx=None):
        return self._attrs(await self.fs.getattr(inode))

    @_errors
    async def opendir(self, inode, ctx):
        return await self.fs.opendir(inode)

    @_errors
    async def readdir(self, fh, start_id, token):
        self.fs.readdir(fh, start_id, lambda node, next_id: pyfuse3.readdir_reply(
            token, node.name, self._attrs(node), next_id))

    @_errors
    async def releasedir(self, fh):
        self.fs.releasedir(fh)

    async def forget(self, inode_list):
        try:
            self.fs.forget(inode_list)
        except Exception:  # pyfuse3: forget must not raise; it answers no request
            log.exception("event=handler_bug op=forget")

    @_errors
    async def open(self, inode, flags, ctx):
        opened = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=opened.fh, keep_cache=opened.keep_cache)

    @_errors
    async def read(self, fh, off, size):
        return await self.fs.read(fh, off, size)

    @_errors
    async def release(self, fh):
        self.fs.release(fh)

    @_errors
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.capacity // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @_errors
    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE and name == STATS_XATTR:
            return self.fs.stats_json()
        if inode == pyfuse3.ROOT_INODE and name == MOUNT_XATTR:
            return self.fs.mount_json()
        if inode != pyfuse3.ROOT_INODE and name == ETAG_XATTR:
            return self.fs.etag(inode)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_errors
    async def listxattr(self, inode, ctx):
        if inode == pyfuse3.ROOT_INODE:
            return [STATS_XATTR, MOUNT_XATTR]
        return [] if (await self.fs.getattr(inode)).is_dir else [ETAG_XATTR]

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _refuse_write
    write = create = setxattr = removexattr = _refuse_write


# --- session control (used by service.py) -----------------------------------------------


def mount(ops: FuseOps, mountpoint: str, options: set[str]) -> None:
    pyfuse3.init(ops, mountpoint, options)


async def serve(max_tasks: int) -> None:
    await pyfuse3.main(min_tasks=2, max_tasks=max_tasks)


def terminate() -> None:
    """Stop taking requests (a graceful stop: those in flight still answer)."""
    pyfuse3.terminate()


def close(unmount: bool) -> None:
    pyfuse3.close(unmount=unmount)
