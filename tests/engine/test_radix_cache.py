import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmudf.engine.kv_pool import KVPool, KVShape
from llmudf.engine.radix_cache import RadixCache


def make_pool(num_pages=32, page_size=1):
    return KVPool(KVShape(num_layers=1, num_kv_heads=1, head_dim=2, page_size=page_size), num_pages)


def test_insert_returns_cached_length_and_splits_on_partial_match():
    cache = RadixCache.simulated()
    assert cache.insert([1, 2, 3, 4]) == 0
    assert cache.insert([1, 2, 5]) == 2
    (top,) = cache.root.children.values()
    assert top.key == (1, 2)
    assert sorted(c.key for c in top.children.values()) == [(3, 4), (5,)]
    assert cache.total_size == 5


def test_match_prefix_splits_the_node_the_match_ends_in():
    cache = RadixCache.simulated()
    cache.insert([1, 2, 3, 4, 5])
    match = cache.match_prefix([1, 2, 3, 9])
    assert match.num_tokens == 3
    assert match.last_node.key == (1, 2, 3)
    assert [c.key for c in match.last_node.children.values()] == [(4, 5)]
    assert cache.match_prefix([7]).num_tokens == 0
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).num_tokens == 5


def test_pages_follow_tokens_through_splits():
    pool = make_pool()
    cache = RadixCache(pool)
    pages = pool.allocate(5)
    cache.insert([1, 2, 3, 4, 5], pages)
    assert cache.match_prefix([1, 2, 3]).pages == pages[:3]
    other = pool.allocate(5)  # the caller computed all 5 tokens again; 3 of them are cached
    assert cache.insert([1, 2, 3, 7, 8], other) == 3
    assert cache.match_prefix([1, 2, 3, 7, 8]).pages == pages[:3] + other[3:]
    assert cache.match_prefix([1, 2, 3, 4, 5]).pages == pages


def test_page_granular_keys():
    pool = make_pool(page_size=2)
    cache = RadixCache(pool, page_size=2)
    pages = pool.allocate(3)  # 5 tokens -> 2 whole pages stored, the third page is partial
    assert cache.insert([1, 2, 3, 4, 5], pages) == 0
    assert cache.total_size == 4
    assert cache.match_prefix([1, 2, 3, 4, 5]).num_tokens == 4
    match = cache.match_prefix([1, 2, 3, 9])  # mismatch inside page 2 -> only page 1 matches
    assert (match.num_tokens, match.pages) == (2, pages[:1])
    assert cache.insert([1, 2, 9, 9], pool.allocate(2)) == 2


def test_evicts_least_recently_used_leaf_first():
    cache = RadixCache.simulated()
    for seq in ([1, 1], [2, 2], [3, 3]):
        cache.insert(seq)
    cache.match_prefix([1, 1])  # refresh [1, 1]: [2, 2] is now the oldest
    assert cache.evict(1) == 2
    assert cache.match_prefix([2, 2]).num_tokens == 0
    assert cache.match_prefix([3, 3]).num_tokens == 2  # refreshes [3, 3]
    cache.evict(1)
    assert cache.match_prefix([1, 1]).num_tokens == 0
    assert cache.match_prefix([3, 3]).num_tokens == 2


def test_parent_becomes_evictable_after_its_children():
    cache = RadixCache.simulated()
    cache.insert([1, 2, 3])
    cache.insert([1, 2, 4])
    assert cache.evict(100) == 4
    assert cache.total_size == 0 and not cache.root.children


def test_locked_nodes_are_never_evicted_and_refcounts_return_to_zero():
    pool = make_pool(num_pages=16)
    cache = RadixCache(pool)
    a, b = pool.allocate(4), pool.allocate(4)
    cache.insert([1, 2, 3, 4], a)
    cache.insert([1, 2, 7, 8], b)
    pool.dec_ref(a)  # the caller drops its own references; the tree keeps its own
    pool.dec_ref(b)
    assert [pool.ref_count(p) for p in a] == [1, 1, 1, 1]
    assert [pool.ref_count(p) for p in b[2:]] == [1, 1]
    assert pool.ref_count(b[0]) == 0  # duplicate pages of the shared prefix were never stored
    node = cache.match_prefix([1, 2, 3, 4]).last_node
    cache.inc_lock_ref(node)
    assert (cache.protected_size, cache.evictable_size) == (4, 2)
    assert cache.evict(100) == 2  # only [7, 8] may go
    assert cache.match_prefix([1, 2, 3, 4]).num_tokens == 4
    cache.dec_lock_ref(node)
    assert (cache.protected_size, cache.evictable_size) == (0, 4)
    assert cache.evict(100) == 4
    assert pool.num_free_pages == pool.num_pages
    assert all(pool.ref_count(p) == 0 for p in range(pool.num_pages))
    with pytest.raises(RuntimeError, match="unlocked"):
        cache.dec_lock_ref(node)


def test_insert_with_a_pool_needs_pages():
    cache = RadixCache(make_pool())
    with pytest.raises(ValueError, match="needs pages"):
        cache.insert([1, 2, 3])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=12),
    st.lists(st.integers(0, 3), max_size=8),
    st.integers(1, 3),
)
def test_match_is_the_longest_common_prefix_with_anything_inserted(inserted, query, page_size):
    cache = RadixCache.simulated(page_size)
    for seq in inserted:
        cache.insert(seq)
    best = 0
    for seq in inserted:
        n = 0
        while n < min(len(seq), len(query)) and seq[n] == query[n]:
            n += 1
        best = max(best, n - n % page_size)
    assert cache.match_prefix(query).num_tokens == best
    stored = {tuple(s[: len(s) - len(s) % page_size]) for s in inserted}
    assert cache.total_size == page_size * len(_all_prefixes(stored, page_size))
    cache.evict(10**6)
    assert cache.total_size == 0


def _all_prefixes(seqs, page_size):
    return {s[:n] for s in seqs for n in range(page_size, len(s) + 1, page_size)}
