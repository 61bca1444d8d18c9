"""A no-op pyfuse3 filesystem: the FUSE overhead reference row.

It serves a flat directory of files of given sizes whose bytes are all zero, with the
same pyfuse3 + trio machinery as tieredfs but no work per read, so tieredfs / nullfs
is what tieredfs costs beyond FUSE itself. The page cache is dropped at each open
(keep_cache=False) unless --keep-cache: then a re-read shows what FUSE's page cache
path costs compared with a native file's.

Run: python -m bench.nullfs MOUNTPOINT [--keep-cache] --file big=268435456 [--file NAME=SIZE ...]
"""

import argparse
import errno
import stat

import pyfuse3
import trio

_FIRST_INO = pyfuse3.ROOT_INODE + 1


class NullFS(pyfuse3.Operations):
    def __init__(self, files: dict[str, int], keep_cache: bool):
        super().__init__()
        self.keep_cache = keep_cache
        self.names = [n.encode() for n in files]
        self.inodes = {name: _FIRST_INO + i for i, name in enumerate(self.names)}
        self.sizes = list(files.values())
        self._zeros: dict[int, bytes] = {}

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o555, 2, 0
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, self.sizes[ino - _FIRST_INO]
        a.st_blksize = 1 << 20
        a.entry_timeout = a.attr_timeout = 60
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        ino = self.inodes.get(name) if parent_inode == pyfuse3.ROOT_INODE else None
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(ino)

    async def getattr(self, inode, ctx=None):
        if inode != pyfuse3.ROOT_INODE and not 0 <= inode - _FIRST_INO < len(self.names):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        for i in range(start_id, len(self.names)):
            if not pyfuse3.readdir_reply(token, self.names[i], self._attrs(_FIRST_INO + i), i + 1):
                return

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=self.keep_cache)

    async def read(self, fh, off, size):
        size = max(0, min(size, self.sizes[fh - _FIRST_INO] - off))
        zeros = self._zeros.get(size)
        if zeros is None:
            zeros = self._zeros[size] = bytes(size)
        return zeros

    async def release(self, fh):
        pass


def _parse_files(specs: list[str]) -> dict[str, int]:
    files = {}
    for spec in specs:
        name, _, size = spec.partition("=")
        files[name] = int(size)
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mountpoint")
    p.add_argument("--file", action="append", default=[], help="NAME=SIZE")
    p.add_argument("--keep-cache", action="store_true", help="keep cached pages across opens")
    args = p.parse_args()
    pyfuse3.init(NullFS(_parse_files(args.file), args.keep_cache), args.mountpoint,
                 {"fsname=nullfs", "subtype=nullfs", "ro"})
    try:
        trio.run(pyfuse3.main)
    except KeyboardInterrupt:
        pass
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
