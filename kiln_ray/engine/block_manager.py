"""BlockManager: fixed-size KV blocks with reference counts and hash-chained prefix caching.

    block ids     0 .. num_blocks-1, each holding block_size token positions
    free queue    blocks with ref_count 0, in eviction order (front = evicted first);
                  a free block may still hold cached KV (it keeps its hash until reused)
    prefix cache  hash(parent hash, block tokens, cache key) -> block id, full blocks only

Allocation takes blocks from the front of the free queue. Freeing a sequence appends its
blocks tail-first, so the end of a sequence is evicted before its (more shareable) prefix.
A prefix hit revives cached blocks (removing them from the free queue) and shares them by
reference count. Block tables are append-only while a sequence holds its blocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from kiln_ray.engine.request import Request


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks covering a request's first `num_tokens` tokens (no references taken yet)."""

    block_ids: tuple[int, ...] = ()
    hashes: tuple[bytes, ...] = ()

    def num_tokens(self, block_size: int) -> int:
        return len(self.block_ids) * block_size


@dataclass(frozen=True)
class BlockCopy:
    """Copy the KV of block `src` into block `dst` (copy-on-write of a shared partial block)."""

    src: int
    dst: int


def block_hash(parent: bytes | None, tokens: list[int], cache_key: str | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update((cache_key or "").encode())
    h.update(b"|")
    h.update(",".join(map(str, tokens)).encode())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.tables: dict[str, list[int]] = {}  # seq_id -> block ids
        self.hash_chains: dict[str, list[bytes]] = {}  # seq_id -> hashes of its full, cached-or-not blocks
        self.prefix_hit_tokens = 0  # cumulative, for stats
        self.prefix_queried_tokens = 0

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def block_ids(self, request: Request) -> list[int]:
        """The sequence's block table (a live list: copy it if it must outlive the step)."""
        return self.tables.get(request.seq_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> PrefixHit:
        """Longest run of cached full blocks at the start of the request's tokens.

        At least one token is always left to compute (its logits are needed), so a prompt that
        is cached in full drops its last block from the hit.
        """
        if not self.enable_prefix_caching:
            return PrefixHit()
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        ids, hashes, parent = [], [], None
        for i in range(max_blocks):
            h = block_hash(parent, request.token_ids[i * bs : (i + 1) * bs], request.cache_key)
            block = self.cached.get(h)
            if block is None:
                break
            ids.append(block)
            hashes.append(h)
            parent = h
        return PrefixHit(tuple(ids), tuple(hashes))

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, request: Request, num_new_tokens: int, prefix: PrefixHit | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens of the request (after any prefix hit).

        All or nothing: returns False, changing nothing, if the free queue is too short.
        On success with a prefix, the hit blocks join the table and
        `request.num_computed_tokens` moves past them.
        """
        table = self.tables.get(request.seq_id, [])
        admission = not table and request.num_computed_tokens == 0
        prefix = prefix or PrefixHit()
        assert not prefix.block_ids or admission
        num_computed = request.num_computed_tokens + prefix.num_tokens(self.block_size)
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(table) - len(prefix.block_ids)
        revived = sum(1 for b in prefix.block_ids if self.ref_counts[b] == 0)
        if needed > self.num_free_blocks - revived:
            return False
        if prefix.block_ids:
            for b in prefix.block_ids:
                if self.ref_counts[b] == 0:
                    del self.free_queue[b]
                self.ref_counts[b] += 1
            table = table + list(prefix.block_ids)
            self.hash_chains[request.seq_id] = list(prefix.hashes)
            request.num_computed_tokens = num_computed
            request.num_cached_tokens = num_computed
            self.prefix_hit_tokens += num_computed
        for _ in range(max(needed, 0)):
            table.append(self._pop_free())
        self.tables[request.seq_id] = table
        if admission and self.enable_prefix_caching:
            self.prefix_queried_tokens += request.num_tokens
        return True

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hashes[block]
        if h is not None:  # evict its cached content
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's computed, full blocks in the prefix cache.

        Call after `num_computed_tokens` advances. A block whose content is already cached
        under another id stays private (and is evicted first when freed).
        """
        if not self.enable_prefix_caching:
            return
        chain = self.hash_chains.setdefault(request.seq_id, [])
        table = self.tables[request.seq_id]
        bs = self.block_size
        num_full = min(request.num_computed_tokens, request.num_tokens) // bs
        while len(chain) < num_full:
            i = len(chain)
            h = block_hash(chain[-1] if chain else None, request.token_ids[i * bs : (i + 1) * bs], request.cache_key)
            chain.append(h)
            block = table[i]
            if h not in self.cached and self.block_hashes[block] is None:
                self.cached[h] = block
                self.block_hashes[block] = h

    def free(self, request: Request) -> None:
        """Drop the sequence's references; blocks reaching zero join the free queue tail-first."""
        table = self.tables.pop(request.seq_id, [])
        self.hash_chains.pop(request.seq_id, None)
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None

    def can_fork(self, parent: Request) -> bool:
        """Whether `fork` has the one free block it may need."""
        return parent.num_computed_tokens % self.block_size == 0 or self.num_free_blocks > 0

    def fork(self, parent: Request, child: Request) -> BlockCopy | None:
        """Give `child` the parent's blocks for its computed tokens: full blocks are shared by
        reference; a partial last block is copied into a fresh block, returned as a BlockCopy
        the runner must perform before the child's next forward. Requires `can_fork(parent)`."""
        assert self.can_fork(parent)
        table = self.tables[parent.seq_id]
        num_full = parent.num_computed_tokens // self.block_size
        shared = table[:num_full]
        for b in shared:
            self.ref_counts[b] += 1
        child_table = list(shared)
        copy = None
        if parent.num_computed_tokens % self.block_size:
            dst = self._pop_free()
            child_table.append(dst)
            copy = BlockCopy(src=table[num_full], dst=dst)
        self.tables[child.seq_id] = child_table
        self.hash_chains[child.seq_id] = list(self.hash_chains.get(parent.seq_id, [])[:num_full])
        return copy
