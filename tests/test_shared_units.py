"""The shared tier's format and collector on a plain directory, without a mount: block
files that verify only as themselves, leases, and eviction order with two collectors."""

import os
import time

import pytest

from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.stats import Counters
from tieredfs.tiers.shared_format import BadBlock, Layout, Perms, decode, encode_header
from tieredfs.tiers.shared_gc import Collector, used
from tieredfs.tiers.shared_store import SharedStore

OBJ = ObjectVersion("bkt", "k/x.bin", '"etag1"', 10 * 4096)


def ref(i: int, obj: ObjectVersion = OBJ) -> BlockRef:
    return BlockRef(obj, i, 4096)


def block_bytes(r: BlockRef, data: bytes) -> bytes:
    return encode_header(r, data) + data


def test_a_block_file_verifies_only_as_itself():
    data = os.urandom(4096)
    raw = block_bytes(ref(1), data)
    assert bytes(decode(raw, ref(1))[1]) == data
    cases = {
        "torn": [raw[:-1], raw[:20], raw[:-4096] + bytes(4096), raw[:-1] + bytes([raw[-1] ^ 1])],
        "foreign": [raw.replace(b"TIEREDFS", b"NOTOURS!", 1)],
        "stale": [raw[:8] + (2).to_bytes(2, "little") + raw[10:]],
    }
    for kind, variants in cases.items():
        for bad in variants:
            with pytest.raises(BadBlock) as e:
                decode(bad, ref(1))
            assert e.value.kind == kind
    with pytest.raises(BadBlock, match="foreign"):
        decode(raw, ref(2))  # a swapped file
    with pytest.raises(BadBlock, match="foreign"):
        decode(raw, ref(1, ObjectVersion("bkt", "k/x.bin", '"etag2"', 10 * 4096)))  # a new version


@pytest.fixture
def store(tmp_path):
    layout = Layout(tmp_path, "ns")
    layout.create(Perms())
    return SharedStore(layout, Perms(), Counters("shared"), lease_ttl=0.5)


def test_leases_exclude_until_released_or_expired(store):
    r = ref(0)
    assert store.take_lease(r) is True
    assert store.take_lease(r) is False and store.poll(r) == "wait"
    store.drop_lease(r)
    assert store.poll(r) == "fetch" and store.take_lease(r) is True
    time.sleep(0.6)  # the holder died: its lease expires
    assert store.take_lease(r) is True and store.counters.get("lease_takeovers") == 1


def test_collector_evicts_least_recently_used_once(store):
    refs = [ref(i) for i in range(8)]
    for r in refs:
        store.publish(store.new_blocks([(r, os.urandom(4096))]))
    # Journal times are whole seconds: a read of block 0 an hour from now makes it the newest.
    with open(store.layout.journal / "other-node.2099010100", "w") as f:
        f.write(f"H {refs[0].id} {time.time() + 3600:.0f}\n")
    size = os.path.getsize(store.layout.block(refs[0].id))
    one = Collector(store.layout, Perms(), quota=4 * size)
    two = Collector(store.layout, Perms(), quota=4 * size)
    assert one._take_lease() and two.run_pass() is None  # a second collector stays out
    one._drop_lease()
    report = one.run_pass()
    assert report["evicted"] == 5 and report["bytes"] == 3 * size  # down to 90% of the quota
    left = [i for i, r in enumerate(refs) if store.layout.block(r.id).exists()]
    assert left == [0, 6, 7]
    again = two.run_pass()
    assert again["evicted"] == 0 and again["already_gone"] == 0 and again["blocks"] == 3


def test_a_dead_collectors_lease_is_broken(store):
    c = Collector(store.layout, Perms(), quota=1 << 20, lease_ttl=0.3)
    assert c._take_lease()
    other = Collector(store.layout, Perms(), quota=1 << 20, lease_ttl=0.3)
    assert other.run_pass() is None
    time.sleep(0.4)
    assert other.run_pass() is not None and not c.lease_path.exists()
    assert used(other.load_state()) == 0
