"""Paged KV-cache block accounting (torch-free).

The cache is `num_blocks` blocks of `block_size` token slots; flat slot id of position p of a
sequence = block_table[p // block_size] * block_size + p % block_size. The model runner owns
the tensors; this class only decides which block belongs to whom.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from lorafold.server.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class BlockAccountingError(RuntimeError):
    """A bookkeeping invariant broke (double free, block owned twice, over-allocation)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        # owner request id per block (None = free): catches double frees and shared blocks.
        self._owner: list[str | None] = [None] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (for the KV-usage gauge)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` lacks to hold num_computed_tokens + num_new_tokens tokens."""
        return max(0, self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= len(self._free)

    def max_new_tokens(self, seq: Sequence) -> int:
        """Most new tokens `seq` could be given now: its spare slots plus every free block."""
        return (len(seq.block_table) + len(self._free)) * self.block_size - seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks to seq.block_table so it covers num_computed_tokens + num_new_tokens."""
        need = self.num_new_blocks(seq, num_new_tokens)
        if need > len(self._free):
            raise BlockAccountingError(
                f"{seq.request_id}: needs {need} more KV blocks, {len(self._free)} free; check can_allocate first"
            )
        for _ in range(need):
            block = self._free.popleft()
            if self._owner[block] is not None:
                raise BlockAccountingError(f"block {block} is on the free list but owned by {self._owner[block]}")
            self._owner[block] = seq.request_id
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` at once and empty its table (a no-op when it has none)."""
        for block in seq.block_table:
            if self._owner[block] != seq.request_id:
                raise BlockAccountingError(
                    f"{seq.request_id} frees block {block} owned by {self._owner[block]!r} "
                    "(double free or stolen block)"
                )
            self._owner[block] = None
            self._free.append(block)
        seq.block_table.clear()

    def check_invariants(self, live: Iterable[Sequence]) -> None:
        """Every block is either free or owned by exactly one live sequence, never both."""
        seen: dict[int, str] = {}
        for seq in live:
            for block in seq.block_table:
                if block in seen:
                    raise BlockAccountingError(f"block {block} in the tables of {seen[block]} and {seq.request_id}")
                if self._owner[block] != seq.request_id:
                    owner = self._owner[block]
                    raise BlockAccountingError(f"block {block} in {seq.request_id}'s table is owned by {owner!r}")
                seen[block] = seq.request_id
        free = set(self._free)
        if len(free) != len(self._free):
            raise BlockAccountingError("a block is on the free list twice")
        if free & seen.keys():
            raise BlockAccountingError(f"blocks both free and owned: {sorted(free & seen.keys())[:5]}")
        if len(free) + len(seen) != self.num_blocks:
            leaked = [b for b in range(self.num_blocks) if b not in free and b not in seen]
            raise BlockAccountingError(f"leaked blocks (neither free nor in a live table): {leaked[:5]}")


def slot_mapping(seq: Sequence, block_size: int, start: int, count: int) -> list[int]:
    """Flat cache slots of positions start .. start+count-1 of `seq` (the model runner's
    KV write addresses)."""
    end = start + count
    if start < 0 or count < 0 or end > len(seq.block_table) * block_size:
        raise BlockAccountingError(f"{seq.request_id}: positions [{start}, {end}) exceed its {len(seq.block_table)} blocks")
    table = seq.block_table
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
