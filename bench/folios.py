"""Mean size of the page-cache folios that hold a file: why a FUSE page-cache read is slower.

ext4 caches a big file in large folios (1 MiB here), so a read walks few of them; the FUSE
page cache of this kernel (6.18) uses 4 KiB folios, and each costs its own lookup and LRU
update (perf: `workingset_activation`, `folio_batch_add_and_move`). Read off
/proc/self/pagemap and /proc/kpageflags, which need root: None without them.
"""

import ctypes
import mmap
import os
import struct
from pathlib import Path

_PAGE = mmap.PAGESIZE
_COMPOUND_TAIL = 1 << 16  # kpageflags: a page of a large folio other than its first
_PFN_MASK = (1 << 55) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def mean_folio_kib(path: Path) -> float | None:
    """Size (KiB) of the folio holding the file's average byte. The file should be in the
    page cache already: a page read in here would be sized by this walk's own readahead."""
    try:
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        flags = os.open("/proc/kpageflags", os.O_RDONLY)
    except OSError:
        return None
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    pages = size // _PAGE
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) if pages else _MAP_FAILED
    try:
        if addr in (None, _MAP_FAILED):
            return None
        folios: list[int] = []  # pages per folio, in file order
        for i in range(pages):
            ctypes.c_char.from_address(addr + i * _PAGE).value  # map the page in
            entry, = struct.unpack("<Q", os.pread(pagemap, 8, (addr // _PAGE + i) * 8))
            pfn = entry & _PFN_MASK
            if not pfn:
                return None  # PFNs are hidden without CAP_SYS_ADMIN
            bits, = struct.unpack("<Q", os.pread(flags, 8, pfn * 8))
            if bits & _COMPOUND_TAIL and folios:
                folios[-1] += 1
            else:
                folios.append(1)
        return sum(n * n for n in folios) / pages * _PAGE / 1024
    finally:
        if addr not in (None, _MAP_FAILED):
            _libc.munmap(addr, size)
        for f in (fd, pagemap, flags):
            os.close(f)
