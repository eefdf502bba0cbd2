"""Paged KV blocks with prefix caching: who holds which block, and which blocks can be reused.

Every block is in exactly one of three places:

    free list ──allocate──▶ referenced (ref_count > 0) ──free, no hash──▶ free list
        ▲                     │   ▲
        │                     │   └── match_prefix (ref +1) ──┐
        │                     └──── free, hashed ──▶ evictable LRU (ref 0, hash kept)
        └──────── allocate evicts the least recently freed ◀──┘

1. `match_prefix(req)` on a request's first schedule (and again after a preemption) walks its
   full blocks, hashing each one chained to its parent: hash(block i) = sha256(hash(block i-1)
   ‖ token ids of block i as int64). It attaches the longest run of blocks already cached and
   sets `req.num_computed_tokens` to their length, always leaving at least the last token to
   compute, so the step produces logits.
2. `allocate(req, n)` grows `req.block_ids` to cover `num_computed_tokens + n` slots, from the
   free list first, then by evicting cached blocks in LRU order; all or nothing.
3. `cache_blocks(req, num_computed)` after a step registers the hash of each block now full of
   computed tokens, each block hashed once (per-request state: blocks hashed, last hash). Blocks
   filled by output tokens are cached too: a preempted request finds its own prompt+output blocks
   on resume, and a follow-up turn that repeats the answer finds them as well. When two requests
   compute the same block concurrently, the first registered keeps the hash; the other block
   stays unhashed and goes back to the free list when freed.
4. `free(req)` drops references tail first, so a request's tail blocks enter the LRU first and
   are evicted before its head, which more requests share.

Collisions: sha256 over a fixed-width encoding (32-byte parent digest, 8 bytes per token, fixed
block size) makes a false match as likely as a sha256 collision, so a hit is treated as proof
that the block holds the same tokens at the same positions. Python's `hash` of a tuple of ints
is 64-bit, unseeded for ints and easy to collide on purpose; it is not used.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from expertmesh.engine.request import Request

_ROOT_HASH = bytes(32)


def hash_block_tokens(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """32-byte digest of a full block chained to its parent's digest (`_ROOT_HASH` for block 0)."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


@dataclass
class _HashState:
    num_hashed: int = 0
    """Leading blocks of the request whose hash is known (matched or registered)."""
    last_hash: bytes = _ROOT_HASH
    """Hash of block num_hashed - 1 (the parent of the next block)."""
    next_hash: bytes | None = None
    """Hash of block num_hashed when match_prefix already computed it (it missed the cache)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        """Cached blocks with ref 0, least recently freed first."""
        self._hash_states: dict[str, _HashState] = {}
        self.prefix_cache_queries = 0
        """Tokens looked up by match_prefix (one lookup per admission attempt)."""
        self.prefix_cache_hits = 0
        """Tokens match_prefix found cached."""
        self.num_evictions = 0
        """Cached blocks whose hash was dropped to reuse the block."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate can hand out: free plus cached-but-unreferenced (evictable)."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live requests."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_tokens(self, req: Request, index: int) -> list[int]:
        start, end = index * self.block_size, (index + 1) * self.block_size
        prompt, num_prompt = req.prompt_token_ids, len(req.prompt_token_ids)
        if end <= num_prompt:
            return prompt[start:end]
        if start >= num_prompt:
            return req.output_token_ids[start - num_prompt:end - num_prompt]
        return prompt[start:] + req.output_token_ids[:end - num_prompt]

    def match_prefix(self, req: Request) -> int:
        """Attach the longest cached run of req's full blocks; returns the tokens found (0 on a miss)."""
        if req.num_computed_tokens or req.block_ids:
            raise RuntimeError(f"match_prefix on {req.request_id!r}, which already has computed tokens")
        self.prefix_cache_queries += req.num_tokens
        if not self.enable_prefix_caching:
            return 0
        state = _HashState()
        self._hash_states[req.request_id] = state
        # (num_tokens - 1) // block_size: an exact multiple of blocks keeps its last block to compute.
        for index in range((req.num_tokens - 1) // self.block_size):
            block_hash = hash_block_tokens(state.last_hash, self._block_tokens(req, index))
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None:
                state.next_hash = block_hash
                break
            if self.ref_counts[block_id] == 0:
                del self.evictable[block_id]
            self.ref_counts[block_id] += 1
            req.block_ids.append(block_id)
            state.num_hashed, state.last_hash = index + 1, block_hash
        num_cached = state.num_hashed * self.block_size
        req.num_computed_tokens = num_cached
        # Prompt tokens only: a resumed request also finds blocks of its own output.
        req.num_cached_tokens = min(num_cached, req.num_prompt_tokens)
        self.prefix_cache_hits += num_cached
        return num_cached

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Grow req.block_ids to cover num_computed_tokens + num_new_tokens slots; False takes nothing."""
        needed = self.num_blocks_for(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            if self.free_block_ids:
                block_id = self.free_block_ids.popleft()
            else:
                block_id, _ = self.evictable.popitem(last=False)
                del self.hash_to_block[self.block_hashes[block_id]]
                self.block_hashes[block_id] = None
                self.num_evictions += 1
            self.ref_counts[block_id] = 1
            req.block_ids.append(block_id)
        return True

    def cache_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Register the hash of every block of req now full of computed tokens (caching on only)."""
        if not self.enable_prefix_caching:
            return
        state = self._hash_states.setdefault(req.request_id, _HashState())
        num_full = min(num_computed_tokens // self.block_size, len(req.block_ids))
        for index in range(state.num_hashed, num_full):
            block_hash = state.next_hash or hash_block_tokens(state.last_hash, self._block_tokens(req, index))
            state.next_hash = None
            block_id = req.block_ids[index]
            if self.block_hashes[block_id] is None and block_hash not in self.hash_to_block:
                self.block_hashes[block_id] = block_hash
                self.hash_to_block[block_hash] = block_id
            state.num_hashed, state.last_hash = index + 1, block_hash

    def free(self, req: Request) -> None:
        """Drop req's references, tail first; clears req.block_ids and its hashing state."""
        for block_id in reversed(req.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.block_hashes[block_id] is not None:
                    self.evictable[block_id] = None
                else:
                    self.free_block_ids.append(block_id)
        req.block_ids.clear()
        self._hash_states.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash; evictable blocks become free, referenced ones stay with their owners."""
        for block_id in self.evictable:
            self.free_block_ids.append(block_id)
        self.evictable.clear()
        self.hash_to_block.clear()
        self.block_hashes = [None] * self.num_blocks

    def check_invariants(self, live_requests: Iterable[Request] | None = None) -> None:
        """Raise AssertionError unless free + evictable + referenced accounting is consistent.

        With `live_requests` (every request holding blocks), ref counts must equal the number of
        times each block appears in their block_ids.
        """
        free, evictable = set(self.free_block_ids), set(self.evictable)
        _require(len(free) == len(self.free_block_ids), "a block is twice in the free list")
        _require(not free & evictable, f"blocks both free and evictable: {free & evictable}")
        for block_id in range(self.num_blocks):
            ref, block_hash = self.ref_counts[block_id], self.block_hashes[block_id]
            _require(ref >= 0, f"block {block_id} has ref count {ref}")
            if block_id in free:
                _require(ref == 0 and block_hash is None, f"free block {block_id} has ref {ref} or a hash")
            elif block_id in evictable:
                _require(ref == 0 and block_hash is not None, f"evictable block {block_id}: ref {ref}")
            else:
                _require(ref > 0, f"block {block_id} is in no list and unreferenced")
            if block_hash is not None:
                _require(self.hash_to_block.get(block_hash) == block_id, f"block {block_id}: hash unmapped")
        _require(len(self.hash_to_block) == sum(h is not None for h in self.block_hashes),
                 "hash table and block hashes disagree")
        referenced = sum(ref > 0 for ref in self.ref_counts)
        _require(len(free) + len(evictable) + referenced == self.num_blocks, "blocks lost or double-counted")
        if live_requests is not None:
            counts = [0] * self.num_blocks
            for req in live_requests:
                for block_id in req.block_ids:
                    counts[block_id] += 1
            _require(counts == self.ref_counts, "ref counts differ from the live requests' block_ids")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)
