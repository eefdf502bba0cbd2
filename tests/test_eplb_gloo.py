"""Moving expert weights between ranks (cluster/rebalance.py) over a real gloo group of 3 spawned
ranks (no Ray): after a rebalance every slot holds its new expert's weights, FP8 weights with their
scales included, and the all-to-all over the new replica tables gives the single-process logits."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from test_ep_gloo import BLOCK, PROMPTS, _logits, leave_group

from expertmesh.cluster.collective import free_port
from expertmesh.engine.config import CacheConfig, ModelLoadConfig
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.model.tiny import make_tiny
from expertmesh.router.eplb import initial_layout, rebalance

WORLD, EXPERTS, REDUNDANT, SLOTS = 3, 12, 3, 5
ASSIGNMENT = [[0, 1], [2, 3], [4]]


def _new_layouts():
    """Layouts a skewed load asks for: layer 0's hot experts 3 and 4, layer 1's 10 and 9."""
    load = [[0.0] * EXPERTS for _ in range(2)]
    load[0][3], load[0][4], load[1][10], load[1][9] = 900, 600, 800, 500
    return rebalance(load, WORLD, REDUNDANT).slot_expert_LP


def _module_weights(e: int, layer: int, fp8: bool) -> dict[str, torch.Tensor]:
    """Distinct contents for expert e of a layer: what the slot must hold after the move."""
    g = torch.Generator().manual_seed(1000 * layer + e)
    w = {"w13_EFD": torch.randn(6, 4, generator=g), "w2_EDF": torch.randn(4, 3, generator=g)}
    if fp8:
        w = {k: v.to(torch.float8_e4m3fn) for k, v in w.items()}
        w |= {"w13_EFD_scale": torch.rand(2, 1, generator=g), "w2_EDF_scale": torch.rand(1, 1, generator=g)}
    return w


def _slot_module(experts: tuple[int, ...], layer: int, fp8: bool) -> torch.nn.Module:
    module = torch.nn.Module()
    per_slot = [_module_weights(e, layer, fp8) for e in experts]
    for name in per_slot[0]:
        module.register_parameter(name, torch.nn.Parameter(torch.stack([w[name] for w in per_slot]),
                                                           requires_grad=False))
    return module


def _move_main(rank, port, out_dir, fp8):
    import torch.distributed as dist

    from expertmesh.cluster.rebalance import move_experts
    from expertmesh.router.eplb import transfers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    old = (initial_layout(EXPERTS, WORLD, REDUNDANT),) * 2
    new = _new_layouts()
    modules = [_slot_module(layout[rank * SLOTS:(rank + 1) * SLOTS], layer, fp8) for layer, layout in enumerate(old)]
    storage = [[p.data_ptr() for p in m.parameters()] for m in modules]
    written = move_experts(modules, transfers(old, new, SLOTS), rank, SLOTS)
    assert storage == [[p.data_ptr() for p in m.parameters()] for m in modules]  # in place
    torch.save({"written": written, "params": [{k: v.clone() for k, v in m.named_parameters()} for m in modules]},
               f"{out_dir}/move{rank}.pt")
    leave_group()


@pytest.mark.parametrize("fp8", [False, True], ids=["float32", "fp8-with-scales"])
def test_a_rebalance_moves_each_slots_new_expert_into_it(tmp_path, fp8):
    mp.spawn(_move_main, args=(free_port(), str(tmp_path), fp8), nprocs=WORLD, join=True)
    old, new = (initial_layout(EXPERTS, WORLD, REDUNDANT),) * 2, _new_layouts()
    changed = 0
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"move{rank}.pt")
        mine = slice(rank * SLOTS, (rank + 1) * SLOTS)
        expected_written = sum(a != b for layer in range(2) for a, b in zip(old[layer][mine], new[layer][mine]))
        assert got["written"] == expected_written
        changed += expected_written
        for layer in range(2):
            for slot, e in enumerate(new[layer][mine]):
                for name, want in _module_weights(e, layer, fp8).items():
                    have = got["params"][layer][name][slot]
                    assert have.dtype == want.dtype and torch.equal(have.view(torch.uint8), want.view(torch.uint8))
    assert changed >= 4  # experts did move between ranks


def _rank_main(rank, port, path, out_dir, fixed):
    import torch.distributed as dist

    from expertmesh.cluster.collective import ProcessGroupAllToAll
    from expertmesh.cluster.rebalance import move_experts
    from expertmesh.model.moe import SparseMoeBlock
    from expertmesh.router.all_to_all import AllToAllDispatcher, ReplicaTables
    from expertmesh.router.eplb import transfers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    old = (initial_layout(EXPERTS, WORLD, REDUNDANT),) * 2
    tables = ReplicaTables(old, EXPERTS, 1 + REDUNDANT, "cpu")
    dispatcher = AllToAllDispatcher(torch.full((EXPERTS,), -1), torch.zeros(EXPERTS, dtype=torch.int64), SLOTS,
                                    ProcessGroupAllToAll(), replicas=tables)
    runner = ModelRunner(ModelLoadConfig(path, dtype="float32", device="cpu"),
                         CacheConfig(block_size=BLOCK, num_blocks=64), rank=rank, ep_size=WORLD,
                         expert_ids=list(old[0][rank * SLOTS:(rank + 1) * SLOTS]), dispatcher=dispatcher,
                         progress=False)
    mine = [PROMPTS[i] for i in ASSIGNMENT[rank]]
    if fixed:  # the decode exchange: one all-to-all each way, rows sized by the most tokens on a rank
        dispatcher.supports_fixed_capacity = True
        most = max(sum(len(PROMPTS[i]) for i in a) for a in ASSIGNMENT)
        dispatcher.begin_step(most, runner.model_config.top_k, hidden_size=runner.model_config.hidden_size,
                              dtype=torch.float32)
        assert dispatcher.capacity == most
    with torch.inference_mode():
        before = _logits(runner, mine, torch.device("cpu"))
        new = _new_layouts()
        blocks = sorted((m for m in runner.model.modules() if isinstance(m, SparseMoeBlock)), key=lambda m: m.moe_index)
        move_experts([b.experts for b in blocks], transfers(old, new, SLOTS), rank, SLOTS)
        tables.update(new)
        after = _logits(runner, mine, torch.device("cpu"))
    torch.save({"before": before, "after": after,
                "w13": [b.experts.w13_EFD.clone() for b in blocks]}, f"{out_dir}/rank{rank}.pt")
    leave_group()


@pytest.mark.parametrize("fixed", [False, True], ids=["exact-splits", "fixed-capacity"])
def test_logits_over_replica_tables_equal_one_process_before_and_after_a_move(tmp_path_factory, tmp_path, fixed):
    path = make_tiny(tmp_path_factory.mktemp("eplb_gloo") / "m12", num_experts=EXPERTS)
    reference = ModelRunner(ModelLoadConfig(str(path), dtype="float32", device="cpu"),
                            CacheConfig(block_size=BLOCK, num_blocks=64), progress=False)
    with torch.inference_mode():
        expected = _logits(reference, PROMPTS, torch.device("cpu"))
    mp.spawn(_rank_main, args=(free_port(), str(path), str(tmp_path), fixed), nprocs=WORLD, join=True)
    new = _new_layouts()
    ref_blocks = [layer.mlp for layer in reference.model.layers]
    for rank, indices in enumerate(ASSIGNMENT):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for i, before, after in zip(indices, got["before"], got["after"]):
            torch.testing.assert_close(before, expected[i], atol=1e-4, rtol=0)
            torch.testing.assert_close(after, expected[i], atol=1e-4, rtol=0)
        for layer, w13 in enumerate(got["w13"]):  # each slot holds the checkpoint's weights of its new expert
            experts = new[layer][rank * SLOTS:(rank + 1) * SLOTS]
            torch.testing.assert_close(w13, ref_blocks[layer].experts.w13_EFD[list(experts)], atol=0, rtol=0)
