"""Sequence-parallel attention (model/sequence_parallel.py): one sequence's keys spread over the
ranks by `zigzag_owner`, queries gathered, partial attentions merged by log-sum-exp. Held to
plain causal attention of the whole sequence on one process: the math alone (shards in one
process) and over real gloo process groups of 2 and 3 ranks, through a prefill in two chunks and
decode steps after it, with a rank that owns nothing in a step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_ep_gloo import leave_group

from expertmesh.cluster.collective import free_port
from expertmesh.model.sequence_parallel import (
    causal_attention_reference,
    merge_partials,
    paged_partial_attention,
    partial_attention,
    plan_shard_attention,
    shard_runs,
    zigzag_owner,
)

H, G, D = 8, 2, 16


def qkv(L: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, H, D, generator=g), torch.randn(L, G, D, generator=g) * 2,
            torch.randn(L, G, D, generator=g))


def test_zigzag_deals_units_there_and_back():
    owners = zigzag_owner(torch.arange(0, 96, 8), world=3, unit=8).tolist()
    assert owners == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    assert zigzag_owner(torch.arange(5), world=1, unit=4).tolist() == [0] * 5
    with pytest.raises(ValueError, match="at least 1"):
        zigzag_owner(torch.arange(3), world=0, unit=4)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("length", [300, 1000, 3000])
def test_zigzag_shares_keys_and_causal_work_evenly(world, length):
    """Every rank holds its share of the keys within two units, and its share of the causal work
    (queries at or after each key it holds) within two units' worth of the longest rows."""
    unit = 16
    positions = torch.arange(length)
    owner = zigzag_owner(positions, world, unit)
    keys = torch.bincount(owner, minlength=world)
    assert (keys - length / world).abs().max() <= 2 * unit
    work = torch.zeros(world, dtype=torch.int64).index_add_(0, owner, length - positions)
    assert (work - work.sum() / world).abs().max() <= 2 * unit * length


def test_shards_merged_by_lse_equal_whole_attention():
    """Keys split into random disjoint shards (one empty, rows that see none of a shard): the
    merged partials equal causal attention over all keys, and so does the merged LSE."""
    L = 157
    q, k, v = qkv(L, seed=1)
    shard_of = torch.randint(0, 4, (L,), generator=torch.Generator().manual_seed(2))
    shard_of[shard_of == 3] = 2  # shard 3 stays empty
    positions = torch.arange(L)
    outs, lses = [], []
    for s in range(4):
        keep = shard_of == s
        out, lse = partial_attention(q, positions, k[keep], v[keep], positions[keep], D ** -0.5)
        outs.append(out)
        lses.append(lse)
    assert torch.isinf(lses[3]).all() and not outs[3].any()
    merged, merged_lse = merge_partials(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(merged, causal_attention_reference(q, k, v), atol=1e-5, rtol=1e-5)
    _, whole_lse = partial_attention(q, positions, k, v, positions, D ** -0.5)
    torch.testing.assert_close(merged_lse, whole_lse, atol=1e-5, rtol=1e-5)


def test_partial_attention_matches_sdpa_with_gqa():
    L = 64
    q, k, v = qkv(L, seed=3)
    out, _ = partial_attention(q, torch.arange(L), k, v, torch.arange(L), D ** -0.5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, sdpa.transpose(0, 1), atol=1e-5, rtol=1e-5)


S = 4  # KV block size of the paged shards


def test_shard_runs_cut_rows_into_runs_in_and_outside_the_shard():
    """Shard at positions 0-3 and 8-11; rows 2, 3 (in it), 4, 5 (outside), 9, 10 (in) and 12
    (outside, after it): each run's sequence length and key limit as the kernel plans them."""
    shard = np.array([0, 1, 2, 3, 8, 9, 10, 11])
    query_start, seq_lens, limit = shard_runs(np.array([2, 3, 4, 5, 9, 10, 12]), shard)
    assert query_start.tolist() == [0, 2, 4, 6, 7]
    assert seq_lens.tolist() == [4, 6, 7, 9]  # in: the keys up to the run's last row; outside: prefix + rows
    assert limit.tolist() == [4, 4, 7, 8]
    empty = shard_runs(np.array([], dtype=np.int64), shard)
    assert empty[0].tolist() == [0] and len(empty[1]) == len(empty[2]) == 0


def test_shard_runs_give_every_row_exactly_the_shard_keys_at_or_before_it():
    """Random shards (one key, none before a row, gaps) and rows in any order, repeats included:
    the keys each row sees under its run's plan (the kernel's causal rule within seq_len, stopped
    at the limit) are exactly the shard's keys at or before the row's position."""
    rng = np.random.default_rng(4)
    for _ in range(500):
        length = int(rng.integers(1, 80))
        shard = np.flatnonzero(rng.random(length) < rng.random())
        if rng.random() < 0.1:
            shard = shard[:1]
        rows = rng.integers(0, length + 3, int(rng.integers(1, 30)))
        if rng.random() < 0.5:
            rows = np.sort(rows)
        query_start, seq_lens, limit = shard_runs(rows, shard)
        assert query_start[0] == 0 and query_start[-1] == len(rows) and (np.diff(query_start) > 0).all()
        assert (limit <= seq_lens).all() and (limit >= 0).all()
        for b in range(len(seq_lens)):
            for i in range(query_start[b], query_start[b + 1]):
                position = seq_lens[b] - (query_start[b + 1] - query_start[b]) + (i - query_start[b])
                assert min(position + 1, limit[b]) == int((shard <= rows[i]).sum())


@pytest.mark.parametrize("rows, shard", [(np.array([1]), np.array([5, 3])), (np.array([1]), np.array([3, 4, 4])),
                                         (np.array([[1]]), np.array([1])), (np.array([1.0]), np.array([1])),
                                         (np.array([-1]), np.array([1])), (np.array([1]), np.array([-2, 1]))])
def test_shard_runs_refuse_positions_they_cannot_plan(rows, shard):
    with pytest.raises(ValueError, match="positions"):
        shard_runs(rows, shard)


def paged_shard(k_LGd, v_LGd, seed, spare=3, block=S):
    """The shard's keys in slots of shuffled blocks of a cache [2, N, block, G, d] (k's device and
    dtype), every other slot NaN: (cache, the shard's block table int32 [M])."""
    L, Gk, d = k_LGd.shape
    M = -(-L // block)
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(M + spare, generator=gen)[:M].to(device=k_LGd.device, dtype=torch.int32)
    cache = torch.full((2, M + spare, block, Gk, d), float("nan"), device=k_LGd.device, dtype=k_LGd.dtype)
    slots = torch.arange(L, device=k_LGd.device)
    cache[0, blocks[slots // block].long(), slots % block] = k_LGd
    cache[1, blocks[slots // block].long(), slots % block] = v_LGd
    return cache, blocks


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("world", [2, 3])
def test_paged_partial_equals_partial_attention_on_every_shard(world, split):
    """The paged kernel over a rank's shard where it lies (blocks shuffled, the rest of the cache
    NaN) equals `partial_attention` on the same keys, output and LSE: rows of a prefill chunk from
    every rank (each rank's owned positions in order, as the all-gather lays them), decode rows,
    and rows before the shard's first key (output 0, LSE -inf). `split`: pieces of 16 keys over
    64 SMs, so decode rows split along the shard and merge in the kernel."""
    unit, length = 16, 301
    q, k, v = qkv(length, seed=11)
    owner = zigzag_owner(torch.arange(length), world, unit)
    chunk = torch.arange(200, 290)
    rows = torch.cat([chunk[owner[chunk] == r] for r in range(world)] + [torch.tensor([3, 17, 299, 300])])
    for rank in range(world):
        shard = torch.nonzero(owner == rank).flatten()
        cache, blocks = paged_shard(k[shard], v[shard], seed=rank)
        kw = dict(min_split_keys=16, split_granule=16, num_sms=64) if split else {}
        plan = plan_shard_attention(rows.numpy(), shard.numpy(), num_q_heads=H, num_kv_heads=G, device="cpu", **kw)
        assert not split or (plan.plan is not None and plan.plan.plan.decode.num_groups > 0)
        got, got_lse = paged_partial_attention(q[rows], cache, blocks, plan, D ** -0.5)
        want, want_lse = partial_attention(q[rows], rows, k[shard], v[shard], shard, D ** -0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
        if int(shard[0]) > 3:  # row 3 comes before this shard's first key
            assert got_lse[int(torch.nonzero(rows == 3)[0, 0])].eq(float("-inf")).all()


def _paged_attend(cache, blocks, all_rows, shard):
    """Step 2 of `sequence_parallel_attention` through the paged kernel: every rank's rows, planned
    once from their host positions (the step plan's), over this rank's shard in its cache. The
    gathered positions must be the ones planned."""
    plan = plan_shard_attention(all_rows, shard, num_q_heads=H, num_kv_heads=G, device="cpu")

    def attend(q_all, positions):
        assert np.array_equal(positions.numpy(), all_rows)
        return paged_partial_attention(q_all, cache, blocks, plan, D ** -0.5)
    return attend


def _rank_main(rank, world, port, out_dir, length, chunks, unit, paged=False):
    import torch.distributed as dist

    from expertmesh.model.sequence_parallel import sequence_parallel_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    q, k, v = qkv(length, seed=7)  # every rank makes the same sequence, then keeps what it owns
    owner = zigzag_owner(torch.arange(length), world, unit)
    shard_k, shard_v, shard_pos = k[:0], v[:0], torch.arange(0)
    results = []
    for lo, hi in chunks:  # prefill chunks, then one-token decode steps
        step = torch.arange(lo, hi)
        mine = step[owner[step] == rank]
        # this step's own keys go into the shard before attention (the cache write comes first)
        shard_k, shard_v = torch.cat((shard_k, k[mine])), torch.cat((shard_v, v[mine]))
        shard_pos = torch.cat((shard_pos, mine))
        rows = [int((owner[step] == r).sum()) for r in range(world)]
        attend = None
        if paged:  # step 2 through the paged kernel over the shard in a cache (the plan's host positions)
            attend = _paged_attend(*paged_shard(shard_k, shard_v, seed=rank),
                                   torch.cat([step[owner[step] == r] for r in range(world)]).numpy(), shard_pos.numpy())
        shard = (None, None, None) if paged else (shard_k, shard_v, shard_pos)  # `attend` reads the cache
        out = sequence_parallel_attention(q[mine], mine, *shard, rows_per_rank=rows, scale=D ** -0.5, attend=attend)
        results.append((mine, out))
    torch.save({"results": results, "shard": shard_pos}, f"{out_dir}/rank{rank}.pt")
    leave_group()


@pytest.mark.parametrize("paged", [False, True], ids=["torch", "paged"])
@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks_equal_one_process_through_prefill_and_decode(tmp_path, world, paged):
    """A 333-token prompt prefilled in two chunks, then four decode steps (each one token, on one
    rank; the others have no rows and still join): every rank's rows equal the one-process causal
    attention over the whole sequence, and the ranks' shards hold every key exactly once. `paged`:
    each rank attends through the paged kernel over its shard in a cache (`attend`)."""
    unit, length = 16, 337
    chunks = [(0, 200), (200, 333), (333, 334), (334, 335), (335, 336), (336, 337)]
    mp.spawn(_rank_main, args=(world, free_port(), str(tmp_path), length, chunks, unit, paged), nprocs=world,
             join=True)
    q, k, v = qkv(length, seed=7)
    expected = causal_attention_reference(q, k, v)
    seen, shards = [], []
    for rank in range(world):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        shards.append(saved["shard"])
        for positions, out in saved["results"]:
            torch.testing.assert_close(out, expected[positions], atol=1e-5, rtol=1e-5)
            seen.append(positions)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(length))
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(length))
    sizes = torch.tensor([len(s) for s in shards])
    assert (sizes - length / world).abs().max() <= 2 * unit


def test_rows_per_rank_must_name_this_ranks_rows(tmp_path):
    mp.spawn(_bad_rows_main, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    assert (tmp_path / "refused").read_text().startswith("rows_per_rank")
    assert "k, v and positions" in (tmp_path / "no_shard").read_text()


def test_paged_partial_refuses_a_plan_or_table_that_does_not_fit():
    q, k, v = qkv(8, seed=0)
    shard = np.arange(8)
    cache, blocks = paged_shard(k, v, seed=0)
    plan = plan_shard_attention(np.arange(8), shard, num_q_heads=H, num_kv_heads=G, device="cpu")
    with pytest.raises(ValueError, match="rows"):
        paged_partial_attention(q[:5], cache, blocks, plan, 1.0)
    with pytest.raises(ValueError, match="does not hold"):
        paged_partial_attention(q, cache, blocks[:1], plan, 1.0)
    nothing = plan_shard_attention(np.arange(8), np.array([], dtype=np.int64), num_q_heads=H, num_kv_heads=G,
                                   device="cpu")
    out, lse = paged_partial_attention(q, cache, blocks[:0], nothing, 1.0)
    assert not out.any() and lse.eq(float("-inf")).all()


def _bad_rows_main(rank, port, out_dir):
    import torch.distributed as dist

    from expertmesh.model.sequence_parallel import sequence_parallel_attention

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    q, k, v = qkv(4, seed=0)
    try:
        sequence_parallel_attention(q, torch.arange(4), k, v, torch.arange(4), rows_per_rank=[3], scale=1.0)
    except ValueError as e:
        Path(out_dir, "refused").write_text(str(e))
    try:  # neither `attend` nor the shard's k/v
        sequence_parallel_attention(q, torch.arange(4), None, None, None, rows_per_rank=[4], scale=1.0)
    except ValueError as e:
        Path(out_dir, "no_shard").write_text(str(e))
    leave_group()


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 4), (64, 4)])
def test_paged_partial_on_the_gpu_equals_partial_attention(heads):
    """bf16 at real sizes: a 40,000-token sequence over 2 ranks (zigzag units of 1,024), blocks of
    16; the rows of a 2,048-token prefill chunk from both ranks and 8 decode rows, over each shard."""
    Hq, Gk, d, block = heads[0], heads[1], 128, 16
    length, world, unit = 40_000, 2, 1024
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(length, Hq, d, device="cuda", generator=gen).bfloat16()
    k = torch.randn(length, Gk, d, device="cuda", generator=gen).bfloat16()
    v = torch.randn(length, Gk, d, device="cuda", generator=gen).bfloat16()
    owner = zigzag_owner(torch.arange(length), world, unit)
    chunk = torch.arange(30_000, 32_048)
    rows = torch.cat([chunk[owner[chunk] == r] for r in range(world)] + [torch.arange(39_992, 40_000)])
    for rank in range(world):
        shard = torch.nonzero(owner == rank).flatten()
        cache, blocks = paged_shard(k[shard.cuda()], v[shard.cuda()], seed=rank, spare=7, block=block)
        plan = plan_shard_attention(rows.numpy(), shard.numpy(), num_q_heads=Hq, num_kv_heads=Gk, device="cuda")
        got, got_lse = paged_partial_attention(q[rows.cuda()], cache, blocks, plan, d ** -0.5)
        want, want_lse = partial_attention(q[rows.cuda()], rows.cuda(), k[shard.cuda()], v[shard.cuda()], shard.cuda(),
                                           d ** -0.5)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got_lse, want_lse, atol=1e-2, rtol=1e-3)
