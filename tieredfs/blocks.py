"""Block addresses and offset arithmetic.

A block is one `block_size`-aligned range of one *version* of one object. The ETag
is part of the address, so a changed object can never be served from an old
version's blocks: the new ETag simply misses.
"""

from dataclasses import dataclass, field

import xxhash


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One version of one S3 object, as pinned by an open file."""

    bucket: str
    key: str
    etag: str
    size: int


@dataclass(frozen=True, slots=True)
class BlockRef:
    obj: ObjectVersion
    index: int
    block_size: int
    # Fixed-length, filesystem-safe address shared by every tier (32 hex chars); computed
    # once, since every tier and the single-flight table look blocks up by it.
    id: str = field(init=False, compare=False, repr=False)
    # The same for the object version's blocks together: tier 1 keeps them in one file.
    file: str = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        o = self.obj
        prefix = f"{o.bucket}\0{o.key}\0{o.etag}\0{self.block_size}"
        object.__setattr__(self, "file", xxhash.xxh3_128_hexdigest(prefix.encode()))
        object.__setattr__(self, "id", xxhash.xxh3_128_hexdigest(f"{prefix}\0{self.index}".encode()))

    @property
    def start(self) -> int:
        return self.index * self.block_size

    @property
    def length(self) -> int:
        return max(0, min(self.block_size, self.obj.size - self.start))



def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def blocks_for_range(obj: ObjectVersion, offset: int, size: int, block_size: int) -> list[BlockRef]:
    """The blocks covering [offset, offset+size) clipped to the object; [] past EOF."""
    end = min(obj.size, offset + size)
    if size <= 0 or offset >= end:
        return []
    first, last = offset // block_size, (end - 1) // block_size
    return [BlockRef(obj, i, block_size) for i in range(first, last + 1)]


def assemble(blocks: list[BlockRef], datas: list[bytes], offset: int, size: int) -> bytes | memoryview:
    """Cut [offset, offset+size) out of consecutive whole blocks.

    Within one block the result is a view, not a copy: pyfuse3 takes any buffer. Across
    blocks it is one copy of the bytes asked for (joining whole blocks and then slicing was
    two copies, of more bytes).
    """
    if not blocks:
        return b""
    end = min(offset + size, blocks[-1].start + blocks[-1].length)
    if len(datas) == 1:
        data, lo, hi = datas[0], offset - blocks[0].start, end - blocks[0].start
        return data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi]
    parts = [memoryview(d) for d in datas]
    parts[0] = parts[0][offset - blocks[0].start:]
    parts[-1] = parts[-1][:end - blocks[-1].start]
    return b"".join(parts)


def in_pieces(items: list, limit: int, size_of) -> list[list]:
    """`items` in order, cut into pieces of at most `limit` bytes by size_of(item) (at
    least one item each): what one system call or one thread hop is given."""
    pieces: list[list] = []
    size = limit
    for item in items:
        n = size_of(item)
        if size + n > limit:
            pieces.append([])
            size = 0
        pieces[-1].append(item)
        size += n
    return pieces
