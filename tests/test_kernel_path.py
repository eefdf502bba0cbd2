"""The engine's kernel path (step inputs in static buffers, the paged-attention kernel, the fused
MoE and small ops, decode padded to a CUDA graph's batch size) against the plain-torch path.

On the CPU the Triton kernels run in Triton's interpreter (tests/conftest.py) and the decode
"graphs" run their padded forward eagerly, so the padding and the static buffers are tested
here too; on a GPU (tests marked `gpu`) the graphs are real, replayed against eager steps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from expertmesh import LLM, SamplingParams
from expertmesh.engine.cuda_graphs import capture_sizes
from expertmesh.engine.step_inputs import StepInputs, host_step

pytest.importorskip("triton")
CPU = not torch.cuda.is_available()

PROMPTS = [[5, 17, 99, 3, 250, 12, 7], [40] * 23, list(range(100, 137)), [8, 9]]


def test_capture_sizes_are_the_ladder():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert capture_sizes(44) == [1, 2, 4, 8, 16, 24, 32, 40, 44]


def test_host_step_index_arithmetic():
    """Two sequences: a 3-token chunk from position 5 (blocks 7, 2 of 4 slots) and a decode at 0."""
    step = host_step(np.array([5, 0]), np.array([3, 1]), [[11, 12, 13], [14]], [np.array([7, 2]), np.array([9])],
                     np.array([True, False]), block_size=4)
    assert step.positions_T.tolist() == [5, 6, 7, 0]
    assert step.slot_mapping_T.tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 9 * 4]
    assert step.query_start_B1.tolist() == [0, 3, 4]
    assert step.seq_lens_B.tolist() == [8, 1]
    assert step.logits_rows.tolist() == [2]
    assert step.input_ids_T.tolist() == [11, 12, 13, 14] and not step.decode_only


def test_step_inputs_pad_a_decode_batch_with_scratch_rows():
    inputs = StepInputs(torch.device("cpu"), max_tokens=16, max_seqs=8, max_blocks_per_seq=4, scratch_block=30,
                        block_size=4)
    step = host_step(np.array([5, 2]), np.array([1, 1]), [[1], [2]], [np.array([3, 4]), np.array([6])],
                     np.array([True, True]), block_size=4)
    inputs.upload(step, pad_seqs_to=4)
    f = inputs.field
    assert f("input_ids", 4).tolist() == [1, 2, 0, 0]
    assert f("positions", 4).tolist() == [5, 2, 0, 0]
    assert f("slot_mapping", 4).tolist() == [4 * 4 + 1, 6 * 4 + 2, 120, 120]  # padding writes the scratch slot
    assert f("valid", 4).tolist() == [1, 1, 0, 0]
    assert f("query_start", 5).tolist() == [0, 1, 2, 3, 4]
    assert f("seq_lens", 4).tolist() == [6, 3, 1, 1]
    assert f("logits_rows", 4).tolist() == [0, 1, 2, 3]
    assert inputs.block_table_BM[:4, :2].tolist() == [[3, 4], [6, 0], [30, 0], [30, 0]]
    with pytest.raises(ValueError, match="exceeds the buffers"):
        inputs.upload(step, pad_seqs_to=9)


def _tokens_and_logprobs(llm, prompts, max_tokens):
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1) for n in max_tokens]
    outs = llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs]


def test_start_up_on_a_gpu_freezes_the_collectors_heap(qwen3_moe_path):
    """What is alive after start-up leaves the garbage collector's generations (a full pass over
    it was a 126 ms step at batch 256 on the H200); on the CPU the heap stays collectable. The
    runner is built on the CPU and told it sits on a GPU, so the CPU runs the same wiring. Shutting
    the engine down thaws the heap (a bench builds several engines in one process)."""
    import gc

    before = gc.get_freeze_count()  # 0 on the CPU machine; a few hundred on the GPU machine, whatever froze them
    llm = LLM(qwen3_moe_path, device="cpu", progress=False, num_kv_blocks=64)
    runner = llm.engine.executor.runner
    assert gc.get_freeze_count() == before  # a CPU engine froze nothing
    marker = [object() for _ in range(1000)]
    try:
        runner.device = torch.device("cuda")
        runner.capture_graphs(progress=False)  # graphs are None on this path: only the freeze runs
        frozen = gc.get_freeze_count()
        assert frozen >= before + len(marker)
        assert not any(o is marker for o in gc.get_objects(generation=2))  # out of the collector's walk
        llm.engine.executor.shutdown()  # the engine's end thaws it: its cycles can be collected again
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        runner.device = torch.device("cpu")


@pytest.mark.skipif(not CPU, reason="the interpreter run; on a GPU test_graphs_replay_the_eager_tokens covers it")
def test_kernel_path_gives_the_torch_paths_tokens_on_the_cpu(qwen3_moe_path):
    """Chunked prefill (budget 16 tokens), mixed steps, prefix-cache hits and decode batches that
    shrink as requests finish (4 -> padded 4, 3 -> padded 4, 2, 1), kernels against plain torch."""
    common = dict(device="cpu", dtype="float32", max_num_batched_tokens=16, max_num_seqs=4, progress=False)
    prompts = PROMPTS + [PROMPTS[2]]  # the repeat hits the prefix cache
    max_tokens = [9, 5, 12, 3, 6]
    ref_tokens, ref_logprobs = _tokens_and_logprobs(LLM(qwen3_moe_path, kernels="torch", **common), prompts, max_tokens)
    fast = LLM(qwen3_moe_path, kernels="triton", **common)
    graphs = fast.engine.executor.runner.graphs
    sizes = []
    inner = graphs.run
    graphs.run = lambda size: sizes.append(size) or inner(size)
    tokens, logprobs = _tokens_and_logprobs(fast, prompts, max_tokens)
    assert tokens == ref_tokens
    assert {1, 2, 4} <= set(sizes)  # decode steps replayed padded to the ladder (3 rows ran as 4)
    for got, ref in zip(logprobs, ref_logprobs):
        for g, r in zip(got, ref):
            (token, value), = ((t, g[t]) for t in r if t in g)
            assert value == pytest.approx(r[token], abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_replay_the_eager_tokens(qwen3_moe_path, dtype):
    """Requests arrive and finish between steps, so decode batches of 1..6 rows hit and miss the
    ladder (1, 2, 4, 8): the graphs' tokens and logprobs are the eager kernel path's."""
    common = dict(device="cuda", dtype=dtype, max_num_seqs=8, num_kv_blocks=512, progress=False)
    prompts = [p * 3 for p in PROMPTS] + [[1, 2, 3], [77] * 40]
    max_tokens = [20, 7, 13, 2, 17, 9]
    eager = LLM(qwen3_moe_path, enforce_eager=True, **common)
    eager_tokens, eager_lp = _tokens_and_logprobs(eager, prompts, max_tokens)
    graphs = LLM(qwen3_moe_path, **common)
    assert graphs.engine.executor.runner.graphs.graphs  # captured
    tokens, logprobs = _tokens_and_logprobs(graphs, prompts, max_tokens)
    tol = 1e-4 if dtype == "float32" else 0.1
    if dtype == "float32":
        assert tokens == eager_tokens
    for got_seq, ref_seq, got_lp, ref_lp in zip(tokens, eager_tokens, logprobs, eager_lp):
        n = next((i for i, (a, b) in enumerate(zip(got_seq, ref_seq)) if a != b), len(ref_seq))
        assert n >= min(4, len(ref_seq))  # bf16: a near-tie may flip later, never at once
        for i in range(n):
            assert got_lp[i][got_seq[i]] == pytest.approx(ref_lp[i][ref_seq[i]], abs=tol)


@pytest.mark.gpu
def test_graphs_agree_with_transformers_in_float32(qwen3_moe_path):
    from transformers import AutoModelForCausalLM

    llm = LLM(qwen3_moe_path, device="cuda", dtype="float32", num_kv_blocks=512, progress=False)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24,
                                                                                  ignore_eos=True))]
    hf = AutoModelForCausalLM.from_pretrained(qwen3_moe_path, dtype=torch.float32).cuda().eval()
    for prompt, tokens in zip(PROMPTS, ours):
        ids = torch.tensor([prompt], device="cuda")
        out = hf.generate(ids, do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0,
                          attention_mask=torch.ones_like(ids))
        assert out[0, len(prompt):].tolist() == tokens


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_decode_step_syncs_the_host_only_to_read_back_tokens(qwen3_moe_path, monkeypatch, async_scheduling):
    """torch's sync debug mode raises on any synchronising call (pageable copies, .item(),
    .tolist() of device tensors); only the wait for the sampled tokens' copy may sync. Run with
    async scheduling (the GPU default) and without."""
    from expertmesh.engine.sampler import SamplerOutput

    llm = LLM(qwen3_moe_path, device="cuda", dtype="bfloat16", max_num_seqs=8, num_kv_blocks=512, progress=False,
              async_scheduling=async_scheduling)
    assert llm.engine.executor.overlaps_steps
    inner = SamplerOutput.wait

    def wait(out):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return inner(out)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(SamplerOutput, "wait", wait)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=12, ignore_eos=True, seed=3)
    llm.generate(PROMPTS[:1], params)  # warm: first calls compile and allocate
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = llm.generate(PROMPTS, [params, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(len(o.outputs[0].token_ids) in (10, 12) for o in outs)


@pytest.mark.gpu
def test_expert_parallel_decode_is_capturable_with_a_one_rank_nccl_group(qwen3_moe_path, tmp_path):
    """The fixed-capacity all-to-all inside a CUDA graph (NCCL collectives are capturable): a
    one-rank NCCL group's graph replays give the tokens of the local dispatcher's eager steps."""
    import torch.distributed as dist

    from expertmesh.cluster.collective import ProcessGroupAllToAll
    from expertmesh.engine.config import CacheConfig, ModelLoadConfig, SchedulerConfig
    from expertmesh.engine.model_runner import ModelRunner
    from expertmesh.engine.step import Chunk, NewRequest, RankChunks, StepPlan
    from expertmesh.router.all_to_all import AllToAllDispatcher

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        load = ModelLoadConfig(str(qwen3_moe_path), device="cuda", dtype="float32")
        cache = CacheConfig(block_size=16, num_blocks=64)
        sched = SchedulerConfig(max_num_seqs=4)
        local = ModelRunner(load, cache, scheduler=sched, progress=False)
        E = local.model_config.num_experts
        device = torch.device("cuda")
        dispatcher = AllToAllDispatcher(torch.zeros(E, dtype=torch.int64, device=device),
                                        torch.arange(E, device=device), E, ProcessGroupAllToAll())
        dispatcher.supports_fixed_capacity = True
        ep = ModelRunner(load, cache, scheduler=sched, dispatcher=dispatcher, progress=False)
        ep.capture_graphs(progress=False)
        assert ep.graphs.graphs
        params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
        prompts = {"a": PROMPTS[0], "b": PROMPTS[1], "c": PROMPTS[3]}
        tokens = {}
        for runner in (local, ep):
            new = tuple(NewRequest(rid, p, params, frozenset()) for rid, p in prompts.items())
            chunks = [Chunk(rid, 0, len(p), [i * 4, i * 4 + 1, i * 4 + 2, i * 4 + 3], True)
                      for i, (rid, p) in enumerate(prompts.items())]
            out = [runner.execute(StepPlan(new, (RankChunks.from_chunks(chunks),), ())).token_ids]
            for _ in range(6):  # decode steps: graphs on the EP runner
                chunks = [Chunk(c.request_id, c.start + c.num_tokens if c.num_tokens > 1 else c.start + 1, 1,
                                c.block_ids, True) for c in chunks]
                out.append(runner.execute(StepPlan((), (RankChunks.from_chunks(chunks),), ())).token_ids)
            tokens[runner is ep] = out
        assert tokens[True] == tokens[False]
    finally:
        dist.destroy_process_group()
