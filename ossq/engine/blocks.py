"""The block manager: which KV blocks are free, who holds each one, and the prefix cache.

Pure Python bookkeeping over block ids; the tensors live in engine/kv.py.

Prefix caching. A block whose BLOCK_TOKENS positions are all written gets a key: the hash of (its
parent block's key, its tokens), so the key names the whole token sequence from position 0 to the
block's end — and a block's keys and values depend on exactly that (causal attention), in every layer,
sliding or full, because every layer stores every position (engine/kv.py). A new request walks its own
tokens block by block and reuses the longest chain of cached blocks, stopping one token short of its
end so that at least its last token is computed (its logits are needed). Only full blocks are shared,
so a prefix that ends mid-block reuses the blocks before it and recomputes the rest; nobody ever writes
into a shared block. The hash table is checked against the stored tokens, so a hash collision is a miss.

Eviction. A block nobody holds stays cached (with its key) until its memory is needed; free blocks that
never got a key are handed out first, then cached ones, least recently released first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from ossq.engine.kv import BLOCK_TOKENS

RELEASED = -1  # a block-table entry whose block left every window (see engine/scheduler.py)


@dataclass
class _Block:
    ref: int = 0
    key: int | None = None
    parent: int | None = None
    tokens: tuple[int, ...] = ()


def block_key(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, *, prefix_cache: bool = True) -> None:
        self.num_blocks, self.prefix_cache = num_blocks, prefix_cache
        self.blocks = [_Block() for _ in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))  # no key, no holder
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, no holder; oldest first
        self.cached: dict[int, int] = {}  # key → block id

    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def match(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """The longest chain of cached full blocks that starts `tokens` and leaves at least one token
        uncovered → (block ids, their keys). Holds nothing: `hold` the ids to keep them."""
        ids: list[int] = []
        keys: list[int] = []
        if not self.prefix_cache:
            return ids, keys
        parent = None
        for i in range((len(tokens) - 1) // BLOCK_TOKENS):
            chunk = tuple(tokens[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS])
            key = block_key(parent, chunk)
            block_id = self.cached.get(key)
            if block_id is None or (self.blocks[block_id].parent, self.blocks[block_id].tokens) != (parent, chunk):
                break
            ids.append(block_id)
            keys.append(key)
            parent = key
        return ids, keys

    def available_for(self, matched: Sequence[int]) -> int:
        """Blocks a request could get after holding `matched` (which may sit in the evictable set)."""
        return self.num_available - sum(1 for b in matched if self.blocks[b].ref == 0)

    def hold(self, ids: Sequence[int]) -> None:
        for b in ids:
            block = self.blocks[b]
            if block.ref == 0:
                self.evictable.pop(b, None)
            block.ref += 1

    def allocate(self, n: int) -> list[int]:
        """`n` fresh blocks, held once each; the caller checked `num_available`."""
        assert n <= self.num_available, "allocate past the free blocks"
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.evictable.popitem(last=False)
                del self.cached[self.blocks[b].key]
                self.blocks[b] = _Block()
            self.blocks[b].ref = 1
            out.append(b)
        return out

    def release(self, ids: Sequence[int]) -> None:
        """Drop one hold on each block; a block nobody holds is cached if it has a key, else free."""
        for b in ids:
            if b == RELEASED:
                continue
            block = self.blocks[b]
            assert block.ref > 0, f"block {b} released more often than held"
            block.ref -= 1
            if block.ref == 0:
                if block.key is not None and self.prefix_cache:
                    self.evictable[b] = None
                else:
                    self.blocks[b] = _Block()
                    self.free.append(b)

    def register(self, block_id: int, parent: int | None, tokens: tuple[int, ...]) -> int:
        """Give a newly full block its key → the key (its children's parent). When another block already
        holds that content, the table keeps the first one and this block stays uncached."""
        key = block_key(parent, tokens)
        if self.prefix_cache and key not in self.cached:
            self.cached[key] = block_id
            self.blocks[block_id] = _Block(ref=self.blocks[block_id].ref, key=key, parent=parent, tokens=tokens)
        return key
