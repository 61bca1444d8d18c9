"""read(file, offset, size) over the tier chain: split into blocks, fetch, assemble."""

from dataclasses import dataclass, field

from .blocks import ObjectVersion, assemble, blocks_for_range
from .readahead import ReadaheadEngine


@dataclass
class OpenFile:
    """One open() of one object version; reads never mix versions.

    A packed file (docs/packs.md) is read as [base, base+length) of its pack: `obj` is then
    the pack, and `own` the file's own object, read instead if the pack cannot be.
    """

    fh: int
    ino: int
    obj: ObjectVersion
    stream: object = field(default=None)  # readahead state, owned by the readahead engine
    base: int = 0
    length: int | None = None
    own: ObjectVersion | None = None

    @property
    def size(self) -> int:
        return self.obj.size if self.length is None else self.length

    def unpack(self) -> None:
        """Read the file's own object from now on."""
        self.obj, self.base, self.length, self.own = self.own, 0, None, None


class Reader:
    def __init__(self, block_size: int, readahead: ReadaheadEngine, recorder=None):
        self.block_size = block_size
        self.readahead = readahead
        self.recorder = recorder  # record.Recorder under --record: notes the blocks reads ask for

    async def read(self, f: OpenFile, offset: int, size: int) -> bytes | memoryview:
        size = min(size, f.size - offset)  # a packed file ends before its pack does
        if size <= 0:
            return b""
        offset += f.base
        refs = blocks_for_range(f.obj, offset, size, self.block_size)
        if not refs:
            return b""
        if self.recorder is not None:
            self.recorder.note(refs)
        if f.own is not None:
            if (held := self.readahead.pack_walks.held(refs)) is not None:
                return assemble(refs, held, offset, size)  # a packed file's blocks, in memory
            # Read and verify only the file's own chunks of its pack's blocks (and the 64 KiB
            # around them, often its neighbours in the pack, then read on the event loop), not
            # the whole 1 MiB blocks for each file.
            end = offset + size
            parts = [await self.readahead.chain.get_part(
                ref, max(offset, ref.start) - ref.start, min(end, ref.start + ref.length) - ref.start)
                for ref in refs]
            return parts[0] if len(parts) == 1 else b"".join(parts)
        return await self.readahead.read(f, refs, offset, size)

    async def opened(self, f: OpenFile) -> None:
        await self.readahead.opened(f)

    def released(self, f: OpenFile) -> None:
        self.readahead.released(f)

    def prefetch_objects(self, objs: list[ObjectVersion]) -> None:
        self.readahead.walks.prefetch(objs)

    def prefetch_range(self, obj: ObjectVersion, start: int, end: int) -> None:
        self.readahead.pack_walks.prefetch(obj, start, end)
