"""The one interface every tier offers to the chain.

Calls are blocking and run in worker threads (except peek and peek_part, which never
block); a tier never talks to another tier.
"""

import enum
from typing import Protocol

from ..blocks import BlockRef


class Peek(enum.Enum):
    """What a tier can say about a block without blocking, when it cannot give its bytes."""

    ABSENT = "absent"  # not in this tier: no need to ask get() in a worker thread
    UNKNOWN = "unknown"  # may be there: ask get()


class Tier(Protocol):
    name: str

    def get(self, ref: BlockRef) -> bytes | None:
        """The block's verified bytes, or None on a miss (including a corrupt copy)."""

    def get_many(self, refs: list[BlockRef]) -> list[bytes | None]:
        """get() of each block, in one call (a tier may read them together)."""

    def get_part(self, ref: BlockRef, lo: int, hi: int) -> bytes | None:
        """Verified bytes [lo, hi) of the block, or None: then the chain asks for all of it."""

    def peek(self, ref: BlockRef) -> bytes | Peek:
        """get without blocking, called on the trio thread: the verified block if it costs no
        wait, else whether get() could find it (a tier that cannot tell says UNKNOWN)."""

    def peek_part(self, ref: BlockRef, lo: int, hi: int) -> bytes | None:
        """get_part without blocking, called on the trio thread: None whenever the answer
        would need to wait (a tier that cannot tell returns None)."""

    def put(self, ref: BlockRef, data: bytes) -> None:
        """Offer a block fetched from below; a tier may decline (full, failing) silently."""

    def put_many(self, items: list[tuple[BlockRef, bytes]]) -> None:
        """put() for several blocks at once, which a tier may store together."""

    def stats(self) -> dict[str, int]:
        """Counters since start, flat name -> number."""
