"""Radix prefix cache: token prefix -> KV pages, shared by every request (SGLang-style).

Each edge holds a run of tokens (a multiple of page_size) and the pages that hold their KV.
Running requests lock the path to their cached prefix (`inc_lock_ref`); `evict` frees the
least recently used unlocked leaves. The tree holds one pool reference per stored page, so a
page lives on while a running request still uses it even if its node is evicted.

With a host tier (a `KVCopier`, as SGLang's hierarchical cache), a node lives on the device,
on the host, or on both. Device eviction writes a node back to host pages before its device
pages go (a node already on the host just drops its device copy); a prefix hit on host nodes
is loaded back into fresh device pages (`load_back`) instead of recomputed. The nodes on the
device always form a top part of the tree (a node's parent is on the device too), so a
match is a device part followed by a host part. Each tier evicts its own LRU candidates;
host eviction drops a node from the tree only when it holds its last copy. Locks protect a
path in both tiers; `evictable_size` / `protected_size` count device tokens, `host_size`
host tokens.

`RadixCache.simulated()` has no pool: tests and the scheduler's look-ahead use it to ask "how
much of this prompt would be shared" without touching memory.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from llmudf.engine.host_kv import KVCopier
from llmudf.engine.kv_pool import KVPool


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "host_value", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...] = (), value: list[int] | None = None, parent=None):
        self.children: dict[tuple[int, ...], TreeNode] = {}  # first page of the child's key ->
        self.parent: TreeNode | None = parent
        self.key = key
        # device page ids, len(key) // page_size of them; None when simulated or host-only
        self.value = value
        self.host_value: list[int] | None = None  # host page ids, when written back
        self.lock_ref = 0
        self.last_access = 0


@dataclass(slots=True)
class MatchResult:
    pages: list[int]  # device KV pages of the matched prefix (empty when simulated)
    num_tokens: int  # tokens of the device part
    last_node: TreeNode  # its last node: lock this to keep the prefix from eviction
    # the host part that follows: its last node and tokens (None, 0 without one)
    host_node: TreeNode | None = None
    num_host_tokens: int = 0


class RadixCache:
    """Token-prefix cache over a KVPool, page-granular, with an optional host tier.

    >>> cache = RadixCache.simulated()
    >>> cache.insert([1, 2, 3])
    0
    >>> cache.match_prefix([1, 2, 9]).num_tokens
    2
    """

    def __init__(self, pool: KVPool | None, page_size: int = 1, copier: KVCopier | None = None):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if copier is not None and pool is None:
            raise ValueError("a host tier needs a device pool")
        self.pool = pool
        self.page_size = page_size
        self.copier = copier
        self.host = copier.host_pool if copier is not None else None
        self._clock = itertools.count(1)
        self.num_loaded_tokens = 0  # host tokens loaded back to the device
        self.num_written_tokens = 0  # device tokens written back to the host
        self.reset()

    @classmethod
    def simulated(cls, page_size: int = 1) -> RadixCache:
        return cls(None, page_size)

    def reset(self) -> None:
        """Forget everything (the caller must hold no locks and own no tree pages)."""
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_size = 0  # device tokens in unlocked nodes
        self.protected_size = 0  # device tokens in locked nodes
        self.host_size = 0  # tokens with a host copy

    @property
    def total_size(self) -> int:
        """Tokens on the device."""
        return self.evictable_size + self.protected_size

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """The longest cached prefix of `key` (whole pages), in both tiers. Splits a node that
        the match ends inside, so the result's nodes cover the match exactly, and refreshes
        LRU times on the path."""
        key = tuple(key[: self._page_floor(len(key))])
        node, pages, num_tokens = self.root, [], 0
        host_node, num_host = None, 0
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
            if self._on_device(child):
                if child.value is not None:
                    pages.extend(child.value)
                num_tokens += n
            else:
                host_node, num_host = child, num_host + n
            node, key = child, key[n:]
        last = node if host_node is None else self._last_on_device(host_node)
        return MatchResult(pages, num_tokens, last, host_node, num_host)

    def load_back(self, match: MatchResult) -> bool:
        """Loads the host part of `match` into fresh device pages (evicting the device LRU if
        needed) and extends `match` with it; False (and `match` unchanged) when the device
        cannot hold it even after eviction."""
        if match.host_node is None:
            return True
        nodes, node = [], match.host_node
        while node is not match.last_node:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        num_pages = match.num_host_tokens // self.page_size
        self.inc_lock_ref(match.host_node)  # neither tier may evict the path meanwhile
        try:
            short = num_pages - self.pool.num_free_pages
            if short > 0:
                self.evict(short)
            if not self.pool.can_allocate(num_pages):
                return False
            pages = self.pool.allocate(num_pages)  # the tree's references
            self.copier.to_device([p for n in nodes for p in n.host_value], pages)
            first = 0
            for n in nodes:
                count = len(n.key) // self.page_size
                n.value = pages[first : first + count]
                first += count
                self.protected_size += len(n.key)  # locked right now
        finally:
            self.dec_lock_ref(match.host_node)
        self.num_loaded_tokens += match.num_host_tokens
        match.pages.extend(pages)
        match.num_tokens += match.num_host_tokens
        match.last_node, match.host_node, match.num_host_tokens = match.host_node, None, 0
        return True

    def insert(self, key: Sequence[int], pages: Sequence[int] | None = None) -> int:
        """Stores `key`'s whole pages (`pages[i]` holds tokens of page i) and returns how many
        tokens were already cached (in either tier). The tree takes its own reference to each
        page it stores; the caller keeps (and later drops) its references, also to duplicate
        pages. Host-only nodes on the path take the caller's pages as their device copy."""
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
                    value = self._page_slice(pages, num_cached, len(key))
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
            if not self._on_device(child):
                child.value = self._page_slice(pages, num_cached, n)
                self.pool.inc_ref(child.value)
                self._add_device_size(child)
            num_cached += n
            node, key = child, key[n:]
        return num_cached

    def evict(self, num_pages: int) -> int:
        """Frees device pages of unlocked nodes without device children, least recently used
        first, until `num_pages` pages went back to the pool (or no such node is left). With a
        host tier each node is written back first (or dropped if the host cannot hold it).
        Returns the pages freed (pages stored when simulated)."""
        heap = [(n.last_access, id(n), n) for n in self._device_leaves()]
        heapq.heapify(heap)
        num_freed = 0
        while num_freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            self.evictable_size -= len(node.key)
            parent = node.parent
            if self.pool is None:
                num_freed += len(node.key) // self.page_size
                self._delete(node)
            else:
                kept = self.host is not None and self._write_back(node)
                num_freed += self.pool.dec_ref(node.value)
                node.value = None
                if not kept:
                    self._delete(node)
            if parent is not self.root and parent.lock_ref == 0 and self._is_device_leaf(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return num_freed

    def evict_host(self, num_pages: int) -> int:
        """Frees host pages of unlocked nodes, least recently used first: a node on both tiers
        just drops its host copy; a host-only node without children leaves the tree. Returns
        the host pages freed."""
        heap = [(n.last_access, id(n), n) for n in self._host_candidates()]
        heapq.heapify(heap)
        num_freed = 0
        while num_freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            num_freed += len(node.host_value)
            self._drop_host(node)
            if node.value is None:
                parent = node.parent
                del parent.children[node.key[: self.page_size]]
                if (
                    parent is not self.root
                    and parent.value is None
                    and parent.lock_ref == 0
                    and not parent.children
                ):
                    heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return num_freed

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protects `node` and its ancestors from eviction in both tiers (one lock per running
        request)."""
        while node is not self.root:
            if node.lock_ref == 0 and self._on_device(node):
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                raise RuntimeError("dec_lock_ref on an unlocked node")
            if node.lock_ref == 1 and self._on_device(node):
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

    def _page_slice(self, pages: Sequence[int], start_token: int, num_tokens: int) -> list[int]:
        first = start_token // self.page_size
        return list(pages[first : first + num_tokens // self.page_size])

    def _on_device(self, node: TreeNode) -> bool:
        return node.value is not None or self.pool is None

    def _last_on_device(self, node: TreeNode) -> TreeNode:
        while node is not self.root and not self._on_device(node):
            node = node.parent
        return node

    def _add_device_size(self, node: TreeNode) -> None:
        if node.lock_ref:
            self.protected_size += len(node.key)
        else:
            self.evictable_size += len(node.key)

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cuts `child`'s edge after n tokens; returns the new upper node."""
        split_pages = n // self.page_size
        upper = TreeNode(child.key[:n], None, child.parent)
        if child.value is not None:
            upper.value = child.value[:split_pages]
            child.value = child.value[split_pages:]
        if child.host_value is not None:
            upper.host_value = child.host_value[:split_pages]
            child.host_value = child.host_value[split_pages:]
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        upper.children[child.key[n : n + self.page_size]] = child
        child.parent.children[child.key[: self.page_size]] = upper
        child.parent = upper
        child.key = child.key[n:]
        return upper

    def _write_back(self, node: TreeNode) -> bool:
        """Gives `node` a host copy (evicting the host LRU if needed); False if none fits.
        Called before its device pages' last reference goes, so they still hold its K/V."""
        if node.host_value is not None:
            return True
        num_pages = len(node.key) // self.page_size
        short = num_pages - self.host.num_free_pages
        if short > 0:
            self.evict_host(short)
        if not self.host.can_allocate(num_pages):
            return False
        node.host_value = self.host.allocate(num_pages)
        self.copier.to_host(node.value, node.host_value)
        self.host_size += len(node.key)
        self.num_written_tokens += len(node.key)
        return True

    def _drop_host(self, node: TreeNode) -> None:
        self.host.free(node.host_value)
        node.host_value = None
        self.host_size -= len(node.key)

    def _delete(self, node: TreeNode) -> None:
        """Removes a node whose device copy is gone, and its host-only subtree."""
        del node.parent.children[node.key[: self.page_size]]
        stack = [node]
        while stack:
            n = stack.pop()
            if n.host_value is not None:
                self._drop_host(n)
            stack.extend(n.children.values())

    def _is_device_leaf(self, node: TreeNode) -> bool:
        return self._on_device(node) and not any(self._on_device(c) for c in node.children.values())

    def _device_leaves(self) -> list[TreeNode]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            on_device = [c for c in node.children.values() if self._on_device(c)]
            if on_device:
                stack.extend(on_device)
            elif node is not self.root and node.lock_ref == 0:
                leaves.append(node)
        return leaves

    def _host_candidates(self) -> list[TreeNode]:
        found, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if (
                node.host_value is not None
                and node.lock_ref == 0
                and (node.value is not None or not node.children)
            ):
                found.append(node)
        return found
