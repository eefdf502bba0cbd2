"""Sharded (sequence-parallel) sequences in the engine (engine/sharded.py, model/sharded_attention.py).

The shard arithmetic against its definition (`zigzag_owner`); the scheduling on a scripted
executor of three ranks, every plan checked (no block on two sequences of a rank, each rank's
shard table exactly its keys, no rank over its token budget): blocks spread over the ranks and
all freed after finish and abort, a running short sequence getting a token every step while a
long prompt prefills, a rank short of blocks preempting its own requests, a shard too large for
a rank's cache refused. Then the real model: one rank in-process and EP groups of 2 and 3 on Ray
(gloo) give the greedy tokens and logprobs of the plain engine, through mixed batches and 32
decode steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmesh import LLM, SamplingParams
from expertmesh.engine.config import CacheConfig, EngineConfig, ModelLoadConfig, ParallelConfig, SchedulerConfig
from expertmesh.engine.core import EngineCore
from expertmesh.engine.scripted import ScriptedExecutor
from expertmesh.model.config import ModelConfig
from expertmesh.model.sequence_parallel import shard_index, shard_positions, shard_sizes, zigzag_owner
from expertmesh.model.sharded_attention import row_counts, row_ranks
from expertmesh.model.tokenizer import Tokenizer

# ---- the arithmetic -------------------------------------------------------------------------


def test_shard_index_positions_and_sizes_agree_with_zigzag_owner():
    rng = np.random.default_rng(0)
    for _ in range(200):
        world, unit, n = int(rng.integers(1, 5)), int(rng.integers(1, 17)), int(rng.integers(0, 600))
        positions = np.arange(n)
        owner = zigzag_owner(torch.from_numpy(positions), world, unit).numpy()
        got_owner, index = shard_index(positions, world, unit)
        assert np.array_equal(got_owner, owner)
        sizes = shard_sizes(n, world, unit)
        assert sizes.tolist() == np.bincount(owner, minlength=world).tolist()
        assert (np.abs(sizes - n / world) <= unit).all()  # every shard within one unit of even
        for r in range(world):
            mine = positions[owner == r]
            assert np.array_equal(shard_positions(n, world, unit, r), mine)
            assert np.array_equal(index[owner == r], np.arange(len(mine)))  # key i in slot i


def test_row_counts_are_the_rows_row_ranks_deals():
    rng = np.random.default_rng(1)
    for _ in range(300):
        world, unit = int(rng.integers(1, 5)), int(rng.integers(1, 9))
        start, n = int(rng.integers(0, 300)), int(rng.integers(0, 200))
        sample, home = bool(rng.random() < 0.5), int(rng.integers(0, world))
        ranks = row_ranks(start, n, sample, home, world, unit)
        assert row_counts(start, n, sample, home, world, unit).tolist() == np.bincount(ranks, minlength=world).tolist()
        if sample and n:
            assert ranks[-1] == home


# ---- scheduling, on a scripted executor of three ranks -------------------------------------

BLOCK = 4
BUDGET = 64


class CheckedExecutor(ScriptedExecutor):
    """Scripted tokens; every plan is checked as the ranks would need it."""

    def execute(self, plan):
        world = self.num_ranks
        rows = np.zeros(world, dtype=np.int64)
        for r, chunks in enumerate(plan.chunks_by_rank):
            rows[r] += chunks.total_tokens
        owners = [dict() for _ in range(world)]  # rank -> block -> the sequence holding it
        for r, chunks in enumerate(plan.chunks_by_rank):
            for i, request_id in enumerate(chunks.request_ids):
                for b in chunks.block_table(i).tolist():
                    assert owners[r].setdefault(b, request_id) == request_id, f"block {b} of rank {r} shared"
        for c in plan.sharded:
            rows += row_counts(c.start, c.num_tokens, c.sample, c.home, world, BLOCK)
            keys = shard_sizes(c.end, world, BLOCK)
            for r in range(world):
                table = c.block_ids_by_rank[r].tolist()
                assert len(table) == -(-int(keys[r]) // BLOCK), "a shard table is not exactly its keys' blocks"
                for b in table:
                    assert owners[r].setdefault(b, c.request_id) == c.request_id, f"block {b} of rank {r} shared"
        assert (rows <= BUDGET).all(), f"rows per rank {rows.tolist()} over the budget"
        return super().execute(plan)


@pytest.fixture
def make_core(qwen3_moe_path):
    def make(num_blocks=256, world=3, threshold=100, max_num_seqs=16):
        tokenizer = Tokenizer.from_pretrained(qwen3_moe_path)
        config = EngineConfig(load=ModelLoadConfig(str(qwen3_moe_path), device="cpu"),
                              cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks, enable_prefix_caching=False),
                              scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=max_num_seqs),
                              parallel=ParallelConfig(sequence_parallel_min_tokens=threshold))
        executor = CheckedExecutor(ModelConfig.from_pretrained(qwen3_moe_path), num_blocks, lambda p: [7] * 1000,
                                   fallback_token=7, num_ranks=world)
        return EngineCore(config, executor, tokenizer)
    return make


def _params(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _all_free(core):
    for bm in core.block_managers:
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_blocks
    return True


def test_sharded_blocks_spread_over_the_ranks_and_all_come_back_after_finish_and_abort(make_core):
    core = make_core()
    core.add_request("long", list(range(10, 610)), _params(3))
    core.add_request("aborted", list(range(20, 620)), _params(100))
    assert core._sequences["long"].sharded and core._sequences["aborted"].sharded
    while core.sharded.num_computed_tokens("long") < 600:
        core.step()
    blocks = core.sharded.shard_blocks("long")
    keys = shard_sizes(600, 3, BLOCK)
    assert [len(b) for b in blocks] == [-(-int(k) // BLOCK) for k in keys]
    assert max(len(b) for b in blocks) - 600 / 3 / BLOCK <= 1  # each rank ~1/3, within one block
    for r, table in enumerate(blocks):  # the core's accounting of each rank holds them
        assert all(core.block_managers[r].ref_counts[b] == 1 for b in table)
    while "long" in core._sequences:
        core.step()
    assert core.sharded.shard_blocks("long") == [[], [], []]
    assert any(core.sharded.shard_blocks("aborted"))
    core.abort("aborted")
    assert _all_free(core) and not core.has_unfinished()


def test_a_running_short_sequence_gets_a_token_every_step_while_a_long_prompt_prefills(make_core):
    core = make_core()
    core.add_request("short", [1, 2, 3, 4, 5], _params(500))
    core.step()
    tokens = lambda: len(core._sequences["short"].output.token_ids)  # noqa: E731
    assert tokens() == 1
    core.add_request("long", [i % 1000 for i in range(3000)], _params(2))
    steps = 0
    while core.sharded.num_computed_tokens("long") < 3000:
        before = tokens()
        core.step()
        steps += 1
        assert tokens() == before + 1, f"step {steps}: the short sequence got no token"
    # 3,000 prompt tokens at most ~(64 - 1) rows per rank a step over 3 ranks: many steps, not one
    assert steps >= 3000 // (3 * BUDGET)
    core.abort(["short", "long"])
    assert _all_free(core)


def test_a_rank_short_of_blocks_preempts_its_own_requests_for_a_sharded_sequence(make_core):
    core = make_core(num_blocks=40)
    for i in range(3):  # one ordinary request per rank, 80 tokens: 20 of each rank's 40 blocks
        core.add_request(f"r{i}", list(range(100 + i, 180 + i)), _params(30))
    core.step()
    core.step()
    # 300 tokens: 25 blocks of 4 on every rank; its first chunk fits the 20 free, the next does not
    core.add_request("long", list(range(300)), _params(5))
    outputs = {}
    while core.has_unfinished():
        for out in core.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0]
    assert core.num_preemptions > 0
    assert {k: (len(v.token_ids), v.finish_reason) for k, v in outputs.items()} == {
        "r0": (30, "length"), "r1": (30, "length"), "r2": (30, "length"), "long": (5, "length")}
    assert _all_free(core)


def test_a_shard_larger_than_a_ranks_cache_fails_the_request_not_the_engine(make_core):
    core = make_core(num_blocks=20)  # 80 tokens a rank: 300 tokens over 3 ranks need 25 blocks
    core.add_request("huge", list(range(300)), _params(2))
    core.add_request("fine", [1, 2, 3], _params(2))
    outputs = {}
    while core.has_unfinished():
        for out in core.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0]
    assert outputs["huge"].finish_reason == "error" and "KV blocks" in outputs["huge"].error
    assert outputs["fine"].finish_reason == "length"
    assert _all_free(core)


def _first_steps(core, executor_log):
    """request id -> the step of the first plan that scheduled it."""
    first = {}
    for step, plan in enumerate(executor_log):
        for chunks in plan.chunks_by_rank:
            for rid in chunks.request_ids:
                first.setdefault(rid, step)
        for c in plan.sharded:
            first.setdefault(c.request_id, step)
    return first


def test_admission_follows_arrival_across_ordinary_and_sharded_sequences(make_core):
    """An ordinary request that arrived before a long prompt starts at once (the long prompt does
    not take its turn), and a steady stream of short requests that arrive after a waiting long
    prompt never starts before it (their admissions, and the blocks they would take, are held)."""
    core = make_core(num_blocks=40)
    log = []
    execute = core.executor.execute
    core.executor.execute = lambda plan: log.append(plan) or execute(plan)
    core.add_request("early", list(range(1, 50)), _params(4))
    core.add_request("long", [i % 1000 for i in range(300)], _params(2))
    core.step()
    assert {"early", "long"} <= set(_first_steps(core, log))  # both in the first step, budget shared
    added, i = {}, 0
    for step in range(200):
        while sum(s.num_running + s.num_waiting for s in core.schedulers) < 12:
            core.add_request(f"o{i}", [1 + (i + j) % 900 for j in range(48)], _params(4 + i % 3))
            added[f"o{i}"] = step
            i += 1
        core.step()
        if step == 20:
            core.add_request("late", list(range(300)), _params(2))
            added["late"] = step
        if "late" in core._sequences and core.sharded.num_computed_tokens("late"):
            break
    first = _first_steps(core, log)
    assert "late" in first, "the waiting sharded sequence never started"
    overtook = [rid for rid, at in added.items() if rid != "late" and at > added["late"] and rid in first
                and first[rid] < first["late"]]
    assert not overtook, f"{overtook} arrived after the long prompt and started before it"
    core.abort(list(core._parents))
    assert _all_free(core)


def test_a_sliding_window_model_refuses_sharding(qwen3_moe_path):
    from dataclasses import replace

    tokenizer = Tokenizer.from_pretrained(qwen3_moe_path)
    model_config = replace(ModelConfig.from_pretrained(qwen3_moe_path), sliding_window=32)
    executor = ScriptedExecutor(model_config, 64, lambda p: [7], num_ranks=2)

    def config(threshold):
        return EngineConfig(load=ModelLoadConfig(str(qwen3_moe_path), device="cpu"),
                            cache=CacheConfig(block_size=BLOCK, num_blocks=64),
                            parallel=ParallelConfig(sequence_parallel_min_tokens=threshold))

    with pytest.raises(ValueError, match="sliding window of 32 tokens"):
        EngineCore(config(100), executor, tokenizer)
    core = EngineCore(config(None), executor, tokenizer)  # the default: off for such a model
    assert not core.sharded.wants(10**6)


def test_sequence_parallel_min_tokens_is_checked():
    with pytest.raises(ValueError, match="sequence_parallel_min_tokens must be >= 0"):
        ParallelConfig(sequence_parallel_min_tokens=-1)


# ---- the real model ---------------------------------------------------------------------------

LENGTHS = (300, 40, 1000, 3000)  # sharded, ordinary, sharded, sharded: mixed in one batch
DECODE = 32


def _prompts():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in LENGTHS]


def _greedy():
    return SamplingParams(temperature=0, max_tokens=DECODE, ignore_eos=True, logprobs=4)


@pytest.fixture(scope="module")
def plain_outputs(qwen3_moe_path):
    llm = LLM(qwen3_moe_path, device="cpu", progress=False, max_num_batched_tokens=512)
    return [o.outputs[0] for o in llm.generate(_prompts(), _greedy())]


def _assert_same(outputs, expected):
    for got, want in zip(outputs, expected):
        assert got.token_ids == want.token_ids and len(got.token_ids) == DECODE
        for g, w in zip(got.logprobs, want.logprobs):
            assert g.keys() == w.keys()
            for token, value in g.items():
                assert value == pytest.approx(w[token], abs=1e-4)


def _count_sharded(llm) -> list[int]:
    """Spy on the in-process executor: the sharded chunks of every plan it runs."""
    counts, execute = [], llm.engine.executor.execute
    llm.engine.executor.execute = lambda plan: counts.append(len(plan.sharded)) or execute(plan)
    return counts


def test_one_rank_sharded_path_equals_the_plain_engine(qwen3_moe_path, plain_outputs):
    llm = LLM(qwen3_moe_path, device="cpu", progress=False, max_num_batched_tokens=512,
              sequence_parallel_min_tokens=256)
    sharded = _count_sharded(llm)
    outputs = [o.outputs[0] for o in llm.generate(_prompts(), _greedy())]
    _assert_same(outputs, plain_outputs)
    assert max(sharded) == 3 and sum(sharded) >= 3 * DECODE  # three prompts ran sharded, decodes too
    assert _all_free(llm.engine)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run of the kernel path")
def test_kernel_path_sharded_rows_give_the_torch_paths_tokens_on_the_cpu(qwen3_moe_path):
    """kernels='triton' in Triton's interpreter: the ordinary rows through the fused rope/KV
    kernel and the paged kernel, the sharded rows through `paged_partial_attention` over their
    shard, in the same steps (budget 32: chunked prefill beside decodes)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (70, 10, 45)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
    common = dict(device="cpu", dtype="float32", max_num_batched_tokens=32, max_num_seqs=4, progress=False)
    want = [o.outputs[0] for o in LLM(qwen3_moe_path, kernels="torch", **common).generate(prompts, params)]
    fast = LLM(qwen3_moe_path, kernels="triton", sequence_parallel_min_tokens=40, **common)
    sharded = _count_sharded(fast)
    got = [o.outputs[0] for o in fast.generate(prompts, params)]
    assert max(sharded) == 2
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        for gl, wl in zip(g.logprobs, w.logprobs):
            for token in wl.keys() & gl.keys():
                assert gl[token] == pytest.approx(wl[token], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [2, 3])
def test_ep_group_sharded_sequences_equal_one_rank(ray_session, qwen3_moe_path, plain_outputs, ep_size):
    llm = LLM(qwen3_moe_path, device="cpu", progress=False, max_num_batched_tokens=512, ep_size=ep_size,
              sequence_parallel_min_tokens=256)
    try:
        engine = llm.engine
        prompts = _prompts()
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, _greedy(), stream=False)
        spread = {}
        outputs = {}
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] = out.outputs[0]
            for i in ("2", "3"):
                if i not in spread and engine.sharded.num_computed_tokens(i) >= len(prompts[int(i)]):
                    spread[i] = [len(b) for b in engine.sharded.shard_blocks(i)]
        _assert_same([outputs[str(i)] for i in range(len(prompts))], plain_outputs)
        for i, counts in spread.items():  # every rank held its share of the sequence's KV
            assert max(counts) - min(counts) <= 2 and sum(counts) >= len(prompts[int(i)]) / 16
        assert _all_free(engine)
    finally:
        llm.shutdown()


@pytest.mark.gpu
def test_one_rank_sharded_path_equals_the_plain_path_on_the_30b_shape_at_32k():
    """nvidia-h200: Qwen3-30B-A3B's shape (48 layers, dummy bf16 weights), a 32,768-token prompt
    on the kernel path: sharded on one rank (its KV in the shard's blocks, attention through
    `paged_partial_attention`) and plain, in the same engine (the threshold switched between the
    runs, so both read the same weights): the same greedy tokens, logprobs within bf16 rounding."""
    from expertmesh.bench.gpu import QWEN3_30B, build_engine

    engine = build_engine(QWEN3_30B, 48, max_model_len=40_000, max_num_seqs=8, kv_bytes=8 << 30)
    prompt = torch.randint(0, 150_000, (32_768,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    results = {}
    for threshold in (16_384, 0):
        engine.sharded.min_tokens = threshold
        engine.add_request(str(threshold), prompt, params, stream=False)
        assert engine._sequences[str(threshold)].sharded == bool(threshold)
        while engine.has_unfinished():
            for out in engine.step():
                results[threshold] = out.outputs[0]
    sharded, plain = results[16_384], results[0]
    assert sharded.token_ids == plain.token_ids
    for got, want in zip(sharded.logprobs, plain.logprobs):
        token = next(iter(want))
        assert got[token] == pytest.approx(want[token], abs=0.05)
