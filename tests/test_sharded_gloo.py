"""Sharded sequences' logits over real gloo groups of 2 and 3 ranks (no Ray): ModelRunners of an
EP group run step plans that carry a 700-token prompt sharded over every rank (prefilled in
chunks of 256, then 32 decode steps, teacher-forced) beside an ordinary sequence on rank 0; the
home rank's logits of every sampling row equal the single-process model's over the whole sequence
within 1e-4 (float32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_ep_gloo import BLOCK, _logits, ep_runner, leave_group

from expertmesh.cluster.collective import free_port
from expertmesh.engine.config import CacheConfig, ModelLoadConfig
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.step import Chunk, NewRequest, RankChunks, StepPlan
from expertmesh.model.sequence_parallel import shard_sizes
from expertmesh.model.sharded_attention import ShardedChunk

PROMPT = torch.randint(0, 1000, (700,), generator=torch.Generator().manual_seed(5)).tolist()
FORCED = torch.randint(0, 1000, (33,), generator=torch.Generator().manual_seed(6)).tolist()
SHORT = [5, 9, 77, 1000, 3]
CHUNK = 256
NUM_BLOCKS = 256


def _steps():
    """(start, tokens) of the sharded sequence's steps: prefill chunks, then one token at a time."""
    tokens = PROMPT + FORCED
    steps = [(s, tokens[s:min(s + CHUNK, len(PROMPT))]) for s in range(0, len(PROMPT), CHUNK)]
    return steps + [(len(PROMPT) + i, [t]) for i, t in enumerate(FORCED[:-1])]


def _rank_main(rank, world, port, path, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    runner, dispatcher = ep_runner(rank, world, path, num_blocks=NUM_BLOCKS)
    dispatcher.supports_fixed_capacity = False
    captured = []
    compute = runner.model.compute_logits
    runner.model.compute_logits = lambda hidden: captured.append(compute(hidden)) or captured[-1]
    home = world - 1  # not rank 0: the ordinary sequence samples there, the sharded one here
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    new = (NewRequest("long", PROMPT, params, frozenset(), rank=home),
           NewRequest("short", SHORT, params, frozenset(), rank=0))
    short_blocks = list(range(NUM_BLOCKS - 12, NUM_BLOCKS))  # apart from every shard's
    mine = []
    with torch.inference_mode():
        for i, (start, tokens) in enumerate(_steps()):
            end = start + len(tokens)
            tables = tuple(np.arange(-(-int(k) // BLOCK), dtype=np.int64) for k in shard_sizes(end, world, BLOCK))
            sharded = ShardedChunk("long", home, start, np.array(tokens, dtype=np.int64), end >= len(PROMPT), tables)
            short_start = 0 if i == 0 else len(SHORT) + i - 1  # the ordinary sequence decodes beside it
            short = Chunk("short", short_start, len(SHORT) if i == 0 else 1, short_blocks, True)
            chunks = tuple(RankChunks.from_chunks([short] if r == 0 else []) for r in range(world))
            captured.clear()
            runner.execute(StepPlan(new if i == 0 else (), chunks, (), sharded=(sharded,)))
            if rank == home and sharded.sample:
                mine.append((end - 1, captured[-1][-1]))  # the sharded row samples last
    torch.save(mine, f"{out_dir}/rank{rank}.pt")
    leave_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_logits_over_gloo_ranks_equal_one_process(qwen3_moe_path, tmp_path, world):
    mp.spawn(_rank_main, args=(world, free_port(), str(qwen3_moe_path), str(tmp_path)), nprocs=world, join=True)
    reference = ModelRunner(ModelLoadConfig(str(qwen3_moe_path), dtype="float32", device="cpu"),
                            CacheConfig(block_size=BLOCK, num_blocks=NUM_BLOCKS), progress=False)
    with torch.inference_mode():
        expected = _logits(reference, [PROMPT + FORCED], torch.device("cpu"))[0]
    got = torch.load(tmp_path / f"rank{world - 1}.pt")
    assert [p for p, _ in got] == list(range(len(PROMPT) - 1, len(PROMPT) + len(FORCED) - 1))
    for position, logits in got:
        assert expected[position].abs().max() > 0.05
        torch.testing.assert_close(logits, expected[position], atol=1e-4, rtol=0)
