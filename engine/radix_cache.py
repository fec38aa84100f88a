"""Radix prefix cache: token prefix -> KV pages, shared by every request (SGLang-style).

Each edge holds a run of tokens (a multiple of page_size) and the pages that hold their KV.
Running requests lock the path to their cached prefix (`inc_lock_ref`); `evict` frees the
least recently used unlocked leaves. The tree holds one pool reference per stored page, so a
page lives on while a running request still uses it even if its node is evicted.

`RadixCache.simulated()` has no pool: tests and the scheduler's look-ahead use it to ask "how
much of this prompt would be shared" without touching memory.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from llmudf.engine.kv_pool import KVPool


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...] = (), value: list[int] | None = None, parent=None):
        self.children: dict[tuple[int, ...], TreeNode] = {}  # first page of the child's key ->
        self.parent: TreeNode | None = parent
        self.key = key
        self.value = value  # page ids, len(key) // page_size of them; None when simulated
        self.lock_ref = 0
        self.last_access = 0


@dataclass(slots=True)
class MatchResult:
    pages: list[int]  # KV pages of the matched prefix (empty when simulated)
    num_tokens: int
    last_node: TreeNode  # lock this to keep the prefix from eviction


class RadixCache:
    """Token-prefix cache over a KVPool, page-granular.

    >>> cache = RadixCache.simulated()
    >>> cache.insert([1, 2, 3])
    0
    >>> cache.match_prefix([1, 2, 9]).num_tokens
    2
    """

    def __init__(self, pool: KVPool | None, page_size: int = 1):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.pool = pool
        self.page_size = page_size
        self._clock = itertools.count(1)
        self.reset()

    @classmethod
    def simulated(cls, page_size: int = 1) -> RadixCache:
        return cls(None, page_size)

    def reset(self) -> None:
        """Forget everything (the caller must hold no locks and own no tree pages)."""
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_size = 0  # tokens in unlocked nodes
        self.protected_size = 0  # tokens in locked nodes

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """The longest cached prefix of `key` (whole pages). Splits a node that the match ends
        inside, so `last_node` covers the match exactly, and refreshes LRU times on the path."""
        key = tuple(key[: self._page_floor(len(key))])
        node, pages, num_tokens = self.root, [], 0
        now = next(self._clock)
        node.last_access = now
        while key:
            child = node.children.get(key[: self.page_size])
            if child is None:
                break
            n = self._match_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            if child.value is not None:
                pages.extend(child.value)
            num_tokens += n
            node, key = child, key[n:]
        return MatchResult(pages, num_tokens, node)

    def insert(self, key: Sequence[int], pages: Sequence[int] | None = None) -> int:
        """Stores `key`'s whole pages (`pages[i]` holds tokens of page i) and returns how many
        tokens were already cached. The tree takes its own reference to each page it stores;
        the caller keeps (and later drops) its references, also to duplicate pages."""
        key = tuple(key[: self._page_floor(len(key))])
        if self.pool is not None and (pages is None or len(pages) < len(key) // self.page_size):
            raise ValueError(f"insert of {len(key)} tokens needs pages for each whole page")
        node, num_cached = self.root, 0
        now = next(self._clock)
        while key:
            child = node.children.get(key[: self.page_size])
            if child is None:
                value = None
                if self.pool is not None:
                    first = num_cached // self.page_size
                    value = list(pages[first : first + len(key) // self.page_size])
                    self.pool.inc_ref(value)
                new = TreeNode(key, value, node)
                new.last_access = now
                node.children[key[: self.page_size]] = new
                self.evictable_size += len(key)
                break
            n = self._match_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            num_cached += n
            node, key = child, key[n:]
        return num_cached

    def evict(self, num_pages: int) -> int:
        """Evicts unlocked leaves, least recently used first, until `num_pages` pages went back
        to the pool (or no unlocked leaf is left). Returns the pages freed (pages stored when
        simulated)."""
        heap = [(n.last_access, id(n), n) for n in self._evictable_leaves()]
        heapq.heapify(heap)
        num_freed = 0
        while num_freed < num_pages and heap:
            _, _, leaf = heapq.heappop(heap)
            if self.pool is not None:
                num_freed += self.pool.dec_ref(leaf.value)
            else:
                num_freed += len(leaf.key) // self.page_size
            parent = leaf.parent
            del parent.children[leaf.key[: self.page_size]]
            self.evictable_size -= len(leaf.key)
            if not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return num_freed

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protects `node` and its ancestors from eviction (one lock per running request)."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                raise RuntimeError("dec_lock_ref on an unlocked node")
            if node.lock_ref == 1:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    # ---- private helpers -------------------------------------------------------------

    def _page_floor(self, n: int) -> int:
        return n - n % self.page_size

    def _match_len(self, a: tuple[int, ...], b: tuple[int, ...]) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return self._page_floor(i)

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cuts `child`'s edge after n tokens; returns the new upper node."""
        split_pages = n // self.page_size
        upper = TreeNode(child.key[:n], None, child.parent)
        if child.value is not None:
            upper.value = child.value[:split_pages]
            child.value = child.value[split_pages:]
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children[child.key[n : n + self.page_size]] = child
        child.parent.children[child.key[: self.page_size]] = upper
        child.parent = upper
        child.key = child.key[n:]
        return upper

    def _evictable_leaves(self) -> list[TreeNode]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if not node.children:
                if node.lock_ref == 0:
                    leaves.append(node)
            else:
                stack.extend(node.children.values())
        return leaves
