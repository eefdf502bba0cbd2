"""BlockManager: accounting, prefix caching, LRU eviction. Pure Python, no model."""
from __future__ import annotations

import pytest

from expertmesh.engine import block_manager as bm_module
from expertmesh.engine.block_manager import BlockManager
from expertmesh.engine.request import Request
from expertmesh.engine.sampling_params import SamplingParams


def make_req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def compute_all(bm: BlockManager, req: Request) -> None:
    """What a scheduled step does for the whole remaining prompt: allocate, compute, cache."""
    assert bm.allocate(req, req.num_tokens - req.num_computed_tokens)
    req.num_computed_tokens = req.num_tokens
    bm.cache_blocks(req, req.num_computed_tokens)


def test_allocate_and_free_accounting():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = make_req("a", range(10)), make_req("b", range(100, 105))
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    assert bm.allocate(a, 10)
    assert len(a.block_ids) == 3 and bm.num_free_blocks == 7 and bm.usage == pytest.approx(0.3)
    bm.check_invariants([a])
    a.num_computed_tokens = 10
    assert bm.allocate(a, 2) and len(a.block_ids) == 3  # slots 10, 11 still in block 2
    assert bm.allocate(a, 3) and len(a.block_ids) == 4
    assert bm.allocate(b, 5) and len(b.block_ids) == 2
    assert not set(a.block_ids) & set(b.block_ids)
    bm.check_invariants([a, b])
    assert bm.num_free_blocks == 4
    big = make_req("big", range(17))
    assert not bm.allocate(big, 17)  # needs 5, 4 left: all or nothing
    assert big.block_ids == [] and bm.num_free_blocks == 4
    bm.check_invariants([a, b])
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 8
    bm.check_invariants([b])
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    bm.check_invariants([])


def test_second_request_reuses_three_block_prefix():
    bm = BlockManager(num_blocks=16, block_size=16)
    prefix = list(range(1000, 1048))  # 3 full blocks
    a = make_req("a", prefix + [1, 2, 3, 4, 5])
    assert bm.match_prefix(a) == 0
    compute_all(bm, a)
    a_blocks = list(a.block_ids)
    bm.free(a)
    bm.check_invariants([])
    assert bm.num_free_blocks == 16  # cached blocks count as free (evictable)

    b = make_req("b", prefix + [7, 8, 9])
    hits_before = bm.prefix_cache_hits
    assert bm.match_prefix(b) == 48
    assert b.num_computed_tokens == 48 and b.num_cached_tokens == 48
    assert b.block_ids == a_blocks[:3]
    assert bm.prefix_cache_hits == hits_before + 48
    assert bm.prefix_cache_queries == a.num_tokens + b.num_tokens
    assert bm.num_free_blocks == 13
    bm.check_invariants([b])
    assert bm.allocate(b, b.num_tokens - 48) and len(b.block_ids) == 4
    bm.check_invariants([b])


def test_shared_blocks_are_ref_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_req("a", range(9))
    bm.match_prefix(a)
    compute_all(bm, a)
    b, c = make_req("b", range(9)), make_req("c", list(range(8)) + [50, 51])
    assert bm.match_prefix(b) == 8 and bm.match_prefix(c) == 8
    assert b.block_ids == c.block_ids == a.block_ids[:2]
    assert [bm.ref_counts[i] for i in a.block_ids[:2]] == [3, 3]
    bm.check_invariants([a, b, c])
    bm.free(a)
    bm.free(b)
    assert [bm.ref_counts[i] for i in c.block_ids] == [1, 1]
    bm.check_invariants([c])
    bm.free(c)
    bm.check_invariants([])
    assert bm.num_free_blocks == 8


def test_prompt_of_exact_full_blocks_keeps_last_block_to_compute():
    bm = BlockManager(num_blocks=16, block_size=16)
    prompt = list(range(48))
    a = make_req("a", prompt)
    bm.match_prefix(a)
    compute_all(bm, a)
    bm.free(a)
    b = make_req("b", prompt)
    assert bm.match_prefix(b) == 32  # 3 full blocks cached, at most 2 matched
    assert b.num_tokens - b.num_computed_tokens == 16
    one_block = make_req("c", prompt[:16])
    assert bm.match_prefix(one_block) == 0
    c = make_req("d", prompt + [99])
    assert bm.match_prefix(c) == 48
    bm.check_invariants([b, one_block, c])


def test_no_match_with_caching_off():
    bm = BlockManager(num_blocks=16, block_size=16, enable_prefix_caching=False)
    prompt = list(range(40))
    a = make_req("a", prompt)
    assert bm.match_prefix(a) == 0
    compute_all(bm, a)
    assert bm.hash_to_block == {}
    bm.free(a)
    assert len(bm.free_block_ids) == 16 and not bm.evictable
    b = make_req("b", prompt)
    assert bm.match_prefix(b) == 0 and b.block_ids == [] and b.num_computed_tokens == 0
    assert bm.prefix_cache_queries == 80 and bm.prefix_cache_hits == 0
    bm.check_invariants([b])


def test_eviction_under_pressure_is_lru_tail_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = make_req("a", range(9)), make_req("b", range(100, 109))  # 2 full blocks + 1 token each
    for req in (a, b):
        bm.match_prefix(req)
        compute_all(bm, req)
    a_full, b_full = a.block_ids[:2], b.block_ids[:2]
    bm.free(a)  # LRU order now: a1, a0 (tail first), then a's unhashed partial block goes free
    bm.free(b)  # then b1, b0
    assert list(bm.evictable) == [a_full[1], a_full[0], b_full[1], b_full[0]]
    assert len(bm.free_block_ids) == 2
    bm.check_invariants([])

    c = make_req("c", range(500, 512))  # 3 blocks: 2 free, then evict a's tail block
    assert bm.allocate(c, 12)
    assert bm.num_evictions == 1 and a_full[1] in c.block_ids
    assert bm.block_hashes[a_full[1]] is None
    bm.check_invariants([c])
    assert bm.match_prefix(make_req("a2", range(9))) == 4  # a's head block survived
    d = make_req("d", range(700, 704))
    assert bm.allocate(d, 4) and d.block_ids == [b_full[1]]  # a0 is now referenced: next LRU is b1
    assert bm.num_evictions == 2
    assert bm.match_prefix(make_req("b2", range(100, 109))) == 4


def test_allocate_failure_evicts_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_req("a", range(9))
    bm.match_prefix(a)
    compute_all(bm, a)
    bm.free(a)
    b = make_req("b", range(50, 66))
    assert not bm.allocate(b, 16)
    assert bm.num_evictions == 0 and len(bm.hash_to_block) == 2
    bm.check_invariants([])


def test_each_block_hashed_once_across_chunks(monkeypatch):
    calls = []
    real = bm_module.hash_block_tokens
    monkeypatch.setattr(bm_module, "hash_block_tokens", lambda p, t: calls.append(1) or real(p, t))
    bm = BlockManager(num_blocks=10, block_size=4)
    req = make_req("a", range(30))
    bm.match_prefix(req)  # hashes block 0, misses: the hash is kept for cache_blocks
    assert len(calls) == 1
    for chunk in (7, 7, 7, 7, 2):
        assert bm.allocate(req, chunk)
        req.num_computed_tokens += chunk
        bm.cache_blocks(req, req.num_computed_tokens)
    assert len(calls) == 7 == len(bm.hash_to_block)  # 30 tokens: 7 full blocks
    req.output_token_ids += [1, 2]  # outputs fill block 7
    assert bm.allocate(req, 2)
    req.num_computed_tokens += 2
    bm.cache_blocks(req, req.num_computed_tokens)
    assert len(calls) == 8 == len(bm.hash_to_block)
    bm.check_invariants([req])


def test_output_blocks_are_found_again_after_free():
    bm = BlockManager(num_blocks=10, block_size=4)
    req = make_req("a", range(6))
    bm.match_prefix(req)
    compute_all(bm, req)
    for token in (40, 41, 42):
        req.output_token_ids.append(token)
        assert bm.allocate(req, 1)
        req.num_computed_tokens += 1
        bm.cache_blocks(req, req.num_computed_tokens)
    bm.free(req)  # as a preemption does; resume is prompt + outputs
    resumed = make_req("a", list(range(6)) + [40, 41, 42])
    assert bm.match_prefix(resumed) == 8


def test_duplicate_block_content_keeps_first_hash():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_req("a", range(5)), make_req("b", range(5))
    for req in (a, b):  # both admitted before either cached: both compute block 0
        bm.match_prefix(req)
    for req in (a, b):
        compute_all(bm, req)
    assert bm.block_hashes[a.block_ids[0]] is not None and bm.block_hashes[b.block_ids[0]] is None
    bm.free(b)
    bm.free(a)
    bm.check_invariants([])
    assert len(bm.evictable) == 1


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_req("a", range(9)), make_req("b", range(100, 109))
    for req in (a, b):
        bm.match_prefix(req)
        compute_all(bm, req)
    bm.free(a)
    bm.reset_prefix_cache()
    bm.check_invariants([b])
    assert not bm.evictable and not bm.hash_to_block and bm.num_free_blocks == 5
    assert bm.match_prefix(make_req("a2", range(9))) == 0
    bm.free(b)
    assert len(bm.free_block_ids) == 8


def test_match_prefix_refuses_a_request_with_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    req = make_req("a", range(5))
    bm.allocate(req, 5)
    with pytest.raises(RuntimeError):
        bm.match_prefix(req)
