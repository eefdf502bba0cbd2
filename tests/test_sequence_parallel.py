"""Sequence-parallel attention (model/sequence_parallel.py): one sequence's keys spread over the
ranks by `zigzag_owner`, queries gathered, partial attentions merged by log-sum-exp. Held to
plain causal attention of the whole sequence on one process: the math alone (shards in one
process) and over real gloo process groups of 2 and 3 ranks, through a prefill in two chunks and
decode steps after it, with a rank that owns nothing in a step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from expertmesh.cluster.collective import free_port
from expertmesh.model.sequence_parallel import (
    causal_attention_reference,
    merge_partials,
    partial_attention,
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


def _rank_main(rank, world, port, out_dir, length, chunks, unit):
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
        out = sequence_parallel_attention(q[mine], mine, shard_k, shard_v, shard_pos, rows_per_rank=rows,
                                          scale=D ** -0.5)
        results.append((mine, out))
    torch.save({"results": results, "shard": shard_pos}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks_equal_one_process_through_prefill_and_decode(tmp_path, world):
    """A 333-token prompt prefilled in two chunks, then four decode steps (each one token, on one
    rank; the others have no rows and still join): every rank's rows equal the one-process causal
    attention over the whole sequence, and the ranks' shards hold every key exactly once."""
    unit, length = 16, 337
    chunks = [(0, 200), (200, 333), (333, 334), (334, 335), (335, 336), (336, 337)]
    mp.spawn(_rank_main, args=(world, free_port(), str(tmp_path), length, chunks, unit), nprocs=world, join=True)
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


def _bad_rows_main(rank, port, out_dir):
    import torch.distributed as dist

    from expertmesh.model.sequence_parallel import sequence_parallel_attention

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    q, k, v = qkv(4, seed=0)
    try:
        sequence_parallel_attention(q, torch.arange(4), k, v, torch.arange(4), rows_per_rank=[3], scale=1.0)
    except ValueError as e:
        Path(out_dir, "refused").write_text(str(e))
    dist.destroy_process_group()
