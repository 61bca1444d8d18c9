"""Block arithmetic: the blocks covering a range, and a read's bytes cut out of them."""

import random

from tieredfs.blocks import ObjectVersion, assemble, blocks_for_range


def test_assemble_gives_exactly_the_bytes_asked_for_within_and_across_blocks():
    rng = random.Random(4)
    for _ in range(3000):
        block_size = rng.choice([16, 64, 100])
        data = rng.randbytes(rng.randint(1, 1000))
        obj = ObjectVersion("bkt", "key", "etag", len(data))
        offset, size = rng.randint(0, len(data) + 10), rng.randint(0, 400)
        refs = blocks_for_range(obj, offset, size, block_size)
        blocks = [data[r.start:r.start + r.length] for r in refs]
        assert bytes(assemble(refs, blocks, offset, size)) == data[offset:offset + size]


def test_a_read_within_one_block_is_a_view_and_a_whole_block_is_itself():
    obj = ObjectVersion("bkt", "key", "etag", 300)
    block = bytearray(range(100))
    [ref] = blocks_for_range(obj, 100, 100, 100)
    assert assemble([ref], [block], 100, 100) is block
    part = assemble([ref], [block], 110, 20)
    assert isinstance(part, memoryview) and part.obj is block and bytes(part) == bytes(range(10, 30))
