"""BlockManager by exact block ids: allocation order, freeing order, prefix hits, eviction."""

from kiln_ray.engine.block_manager import BlockCopy, BlockManager
from kiln_ray.engine.request import Request
from kiln_ray.engine.sampling_params import SamplingParams


def req(rid: str, tokens: list[int], cache_key: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(), cache_key=cache_key)


def test_allocation_takes_lowest_free_blocks_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(10)))
    assert bm.allocate(a, 10)
    assert bm.block_ids(a) == [0, 1, 2]
    b = req("b", list(range(100, 105)))
    assert bm.allocate(b, 5)
    assert bm.block_ids(b) == [3, 4]
    assert bm.num_free_blocks == 3


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = req("a", list(range(8)))
    assert bm.allocate(a, 8)
    b = req("b", list(range(100, 109)))
    assert not bm.allocate(b, 9)
    assert bm.block_ids(b) == [] and bm.num_free_blocks == 1


def test_growing_a_sequence_appends_blocks_only_at_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(4)))
    assert bm.allocate(a, 4)
    a.num_computed_tokens = 4
    a.token_ids.append(99)
    assert bm.allocate(a, 1)
    assert bm.block_ids(a) == [0, 1]
    a.num_computed_tokens = 5
    a.token_ids.append(98)
    assert bm.allocate(a, 1)
    assert bm.block_ids(a) == [0, 1]


def test_free_returns_blocks_tail_first_so_prefixes_are_evicted_last():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = req("a", list(range(6)))
    assert bm.allocate(a, 6)  # blocks 0, 1, 2; block 3 free
    bm.free(a)
    assert list(bm.free_queue) == [3, 2, 1, 0]
    b = req("b", list(range(50, 54)))
    assert bm.allocate(b, 4)
    assert bm.block_ids(b) == [3, 2]


def test_prefix_hit_reuses_cached_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    a = req("a", prompt)
    assert bm.allocate(a, 10)  # [0, 1, 2]
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)  # blocks 0 and 1 are full -> cached
    b = req("b", prompt[:8] + [77, 78, 79])
    hit = bm.find_cached_prefix(b)
    assert hit.block_ids == (0, 1)
    assert bm.allocate(b, 3, hit)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.block_ids(b) == [0, 1, 3]
    assert bm.ref_counts[0] == 2 and bm.ref_counts[1] == 2
    assert bm.prefix_hit_tokens == 8


def test_prefix_hit_always_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(8)))
    assert bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    b = req("b", list(range(8)))  # identical, fully cached prompt
    hit = bm.find_cached_prefix(b)
    assert hit.block_ids == (0,)  # the last block is recomputed for its logits


def test_cache_key_separates_prefixes():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req("a", list(range(9)), cache_key="adapter-x@1")
    assert bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    assert bm.find_cached_prefix(req("b", list(range(9)), cache_key="adapter-x@2")).block_ids == ()
    assert bm.find_cached_prefix(req("c", list(range(9)))).block_ids == ()
    assert bm.find_cached_prefix(req("d", list(range(9)), cache_key="adapter-x@1")).block_ids == (0, 1)


def test_freed_cached_blocks_are_revived_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    assert bm.allocate(a, 5)  # [0, 1, 2]
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)  # 0 -> [1,2], 1 -> [3,4]
    bm.free(a)  # free queue: 3, 2, 1, 0
    b = req("b", [1, 2, 3, 4, 9])
    hit = bm.find_cached_prefix(b)
    assert hit.block_ids == (0, 1)
    assert bm.allocate(b, 1, hit)
    assert bm.block_ids(b) == [0, 1, 3]
    assert list(bm.free_queue) == [2]
    bm.free(b)  # tail first: 3, then 1, then 0
    assert list(bm.free_queue) == [2, 3, 1, 0]
    # Taking three fresh blocks evicts 2, 3 and then cached block 1 ([3, 4]); 0 survives.
    c = req("c", [7, 7, 7, 7, 7, 7])
    assert bm.allocate(c, 6)
    assert bm.block_ids(c) == [2, 3, 1]
    assert bm.find_cached_prefix(req("d", [1, 2, 3, 4, 5])).block_ids == (0,)


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = req("p", list(range(10)))
    assert bm.allocate(parent, 10)  # [0, 1, 2], block 2 half full
    parent.num_computed_tokens = 10
    child = Request("p", list(range(10)), SamplingParams(), index=1)
    assert bm.can_fork(parent)
    copy = bm.fork(parent, child)
    assert copy == BlockCopy(src=2, dst=3)
    assert bm.block_ids(child) == [0, 1, 3]
    assert bm.ref_counts[:4] == [2, 2, 1, 1]
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8
