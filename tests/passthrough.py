"""A tiny pyfuse3 passthrough filesystem: the stand-in for an NFS server in the tests.

This machine has no kernel NFS client. Mounted over a plain directory, this serves it
unchanged; stopped with SIGSTOP, every call on the mount blocks in the kernel, as calls
on a dead NFS server's mount do. (Its own pyfuse3 import is the test's, not tieredfs's.)

Run: python tests/passthrough.py SOURCE MOUNTPOINT   (prints READY once mounted)
"""

import errno
import os
import sys

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: str):
        super().__init__()
        self.paths = {pyfuse3.ROOT_INODE: source}
        self.inodes = {os.lstat(source).st_ino: pyfuse3.ROOT_INODE}

    def _path(self, inode: int, name: bytes | None = None) -> str:
        base = self.paths[inode]
        return base if name is None else os.path.join(base, os.fsdecode(name))

    def _attrs(self, path: str) -> pyfuse3.EntryAttributes:
        st = _os(os.lstat, path)
        ino = self.inodes.get(st.st_ino)
        if ino is None:
            ino = self.inodes[st.st_ino] = st.st_ino + 1
        self.paths[ino] = path
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev"):
            setattr(a, field, getattr(st, field))
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.st_blksize, a.st_blocks = st.st_blksize, st.st_blocks
        a.entry_timeout = a.attr_timeout = 0  # every call reaches this process
        return a

    async def lookup(self, parent, name, ctx=None):
        return self._attrs(self._path(parent, name))

    async def getattr(self, inode, ctx=None):
        return self._attrs(self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            _os(os.truncate, path, attr.st_size)
        if fields.update_mode:
            _os(os.chmod, path, attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:
            _os(os.chown, path, attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1)
        return self._attrs(path)

    async def mkdir(self, parent, name, mode, ctx):
        path = self._path(parent, name)
        _os(os.mkdir, path, mode)
        return self._attrs(path)

    async def unlink(self, parent, name, ctx):
        _os(os.unlink, self._path(parent, name))

    async def rmdir(self, parent, name, ctx):
        _os(os.rmdir, self._path(parent, name))

    async def rename(self, old_parent, old_name, new_parent, new_name, flags, ctx):
        _os(os.rename, self._path(old_parent, old_name), self._path(new_parent, new_name))

    async def link(self, inode, new_parent, new_name, ctx):
        path = self._path(new_parent, new_name)
        _os(os.link, self._path(inode), path)
        return self._attrs(path)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        names = sorted(_os(os.listdir, self._path(fh)))
        for i, name in enumerate(names[start_id:], start_id):
            try:
                attrs = self._attrs(os.path.join(self._path(fh), name))
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i + 1):
                return

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=_os(os.open, self._path(inode), flags & ~os.O_CREAT))

    async def create(self, parent, name, mode, flags, ctx):
        path = self._path(parent, name)
        fd = _os(os.open, path, flags | os.O_CREAT, mode)
        return pyfuse3.FileInfo(fh=fd), self._attrs(path)

    async def read(self, fh, off, size):
        return _os(os.pread, fh, size, off)

    async def write(self, fh, off, buf):
        return _os(os.pwrite, fh, buf, off)

    async def fsync(self, fh, datasync):
        _os(os.fsync, fh)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        os.close(fh)

    async def statfs(self, ctx):
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out


def _os(fn, *args):
    try:
        return fn(*args)
    except OSError as e:
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from None


def main() -> None:
    source, mountpoint = sys.argv[1], sys.argv[2]
    pyfuse3.init(Passthrough(source), mountpoint, {"fsname=passthrough", "default_permissions"})
    print("READY", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
