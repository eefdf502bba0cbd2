"""Expert parallelism without Ray or a process group: placement tables and the dispatch/combine
index arithmetic on hand-worked layouts."""
from __future__ import annotations

import pytest
import torch

from expertmesh.cluster.placement import ExpertPlacement, rank_bundles, unplaceable
from expertmesh.router import token_exchange
from expertmesh.router.all_to_all import plan_receive, plan_send
from expertmesh.router.dispatch import LocalDispatcher


def test_contiguous_placement():
    p = ExpertPlacement.contiguous(num_experts=8, ep_size=3)
    assert p.rank_experts == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert p.owner_E == (0, 0, 0, 1, 1, 1, 2, 2)
    assert p.slot_E == (0, 1, 2, 0, 1, 2, 0, 1)
    assert p.max_local_experts == 3
    assert ExpertPlacement.contiguous(128, 8).rank_experts[7] == tuple(range(112, 128))


def test_a_placement_must_cover_every_expert_once():
    with pytest.raises(ValueError, match="exactly one rank"):
        ExpertPlacement(4, ((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="cannot be spread"):
        ExpertPlacement.contiguous(2, 4)


def test_bundles():
    assert rank_bundles(2, "cuda") == [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert rank_bundles(3, "cpu", cpus_per_rank=2) == [{"CPU": 2}] * 3
    assert rank_bundles(4, "cpu") == [{"CPU": 0.5}] * 4  # a CPU rank reserves half a CPU by default
    assert rank_bundles(2, "cpu", cpus_per_rank=0.25) == [{"CPU": 0.25}] * 2


def test_unplaceable_names_what_no_node_or_cluster_has():
    two_cores, gpu_nodes = [{"CPU": 2.0}], [{"CPU": 16.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 8.0}]
    assert unplaceable(rank_bundles(4, "cpu"), two_cores) is None
    assert unplaceable(rank_bundles(3, "cpu", cpus_per_rank=1), two_cores) == \
        "CPU: 3 asked in all, the cluster has 2 (a bundle needs up to 1 on one node, the largest node has 2)"
    assert unplaceable(rank_bundles(16, "cuda"), gpu_nodes) is None
    assert unplaceable(rank_bundles(17, "cuda"), gpu_nodes).startswith("GPU: 17 asked in all, the cluster has 16")
    assert unplaceable([{"CPU": 20.0}], gpu_nodes).startswith("CPU: 20 asked in all, the cluster has 32 (a bundle "
                                                              "needs up to 20 on one node, the largest node has 16)")
    assert unplaceable(rank_bundles(1, "cuda"), two_cores).startswith("GPU: 1 asked in all, the cluster has 0")


def test_send_plan_orders_copies_by_rank_then_expert():
    # 4 experts over 2 ranks: rank 0 owns experts 0, 1; rank 1 owns 2, 3 (slots 0, 1 on each).
    p = ExpertPlacement.contiguous(4, 2)
    owner, slot = torch.tensor(p.owner_E), torch.tensor(p.slot_E)
    # 3 tokens, top-2. Copy c = t*2 + k:  c0 e2, c1 e0 | c2 e1, c3 e3 | c4 e3, c5 e2
    ids = torch.tensor([[2, 0], [1, 3], [3, 2]])
    plan = plan_send(ids, owner, slot, num_ranks=2, max_slots=2)
    # keys (rank*2 + slot): c0 2, c1 0, c2 1, c3 3, c4 3, c5 2 -> stable order by key
    assert plan.order_N.tolist() == [1, 2, 0, 5, 3, 4]
    assert plan.counts_RX.tolist() == [[1, 1], [2, 2]]  # to rank 0: e0 x1, e1 x1; to rank 1: e2 x2, e3 x2


def test_receive_plan_regroups_rows_by_local_expert():
    # Rows arrive grouped by source rank, each source's rows sorted by slot:
    #   from rank 0: slot 0 x1, slot 1 x2   -> rows 0 (s0), 1 (s1), 2 (s1)
    #   from rank 1: slot 0 x2, slot 1 x0   -> rows 3 (s0), 4 (s0)
    recv = plan_receive(torch.tensor([[1, 2], [2, 0]]), num_local_experts=2, num_rows=5)
    assert recv.perm_M.tolist() == [0, 3, 4, 1, 2]
    assert recv.expert_M.tolist() == [0, 0, 0, 1, 1]
    assert recv.counts_E.tolist() == [3, 2]


def test_receive_plan_of_a_rank_with_fewer_experts_and_no_rows():
    recv = plan_receive(torch.zeros(3, 2, dtype=torch.int64), num_local_experts=1, num_rows=0)
    assert recv.perm_M.numel() == 0 and recv.counts_E.tolist() == [0]


def test_fixed_capacity_rows_carry_each_token_once_per_rank_with_its_slots_and_weights():
    # 2 ranks, 2 slots each; 3 tokens, top-2, capacity 3. Token 0 -> rank 1 slot 0 and rank 0 slot 0;
    # token 1 -> rank 0 slots 1 and 0 (one row carries both); token 2 -> rank 1 slots 1 and 0.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    dest = torch.tensor([[1, 0], [0, 0], [1, 1]])
    slot = torch.tensor([[0, 0], [1, 0], [1, 0]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.625, 0.375]])
    sent = token_exchange.pack(x, dest, slot, w, token_exchange.RowPlan(2, "cpu"), capacity=3)
    assert sent.row_TR.tolist() == [[0, 3], [1, 6], [6, 4]]  # 6 = R*C: the spare row (nothing sent)
    hidden_bytes, width = token_exchange.row_layout(2, torch.float32, 2)
    assert sent.block_MW.shape == (6, width)
    rows = sent.block_MW
    none = token_exchange.NONE
    assert rows[[0, 1, 3, 4], :hidden_bytes].view(torch.float32).tolist() == [[1, 2], [3, 4], [1, 2], [5, 6]]
    slots = rows[:, hidden_bytes: hidden_bytes + 8].view(torch.int32).tolist()
    assert slots == [[none, 0], [1, 0], [none, none], [0, none], [1, 0], [none, none]]  # rows 2, 5: unfilled
    assert rows[[0, 1, 3, 4], hidden_bytes + 8:].view(torch.float32).tolist() == [
        [0, 0.25], [0.5, 0.5], [0.75, 0], [0.625, 0.375]]


def _exchange_in_process(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """What all_to_all_single does with even splits, for R ranks in one process."""
    R = len(blocks)
    return [torch.cat([b.chunk(R)[r] for b in blocks]) for r in range(R)]


@pytest.mark.parametrize("ranks, tokens", [(2, [5, 3]), (3, [4, 0, 2]), (4, [1, 1, 1, 1])])
def test_fixed_capacity_exchange_equals_the_local_dispatcher(ranks, tokens):
    """R ranks in one process, each expert a different scaling: dispatch, experts, combine over the
    single exchange each way give every rank the local dispatcher's output; rows the experts skip
    (past the last valid one) hold NaN here and must not leak."""
    E, K, D, X = 4 * ranks, 3, 8, 4
    placement = ExpertPlacement.contiguous(E, ranks)
    owner, slot = torch.tensor(placement.owner_E), torch.tensor(placement.slot_E)
    gen = torch.Generator().manual_seed(ranks)
    xs = [torch.randn(t, D, generator=gen) for t in tokens]
    ids = [torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)]) if t else
           torch.zeros(0, K, dtype=torch.int64) for t in tokens]
    ws = [torch.softmax(torch.randn(t, K, generator=gen), -1) for t in tokens]
    scale_E = torch.arange(1, E + 1, dtype=torch.float32)
    C = max(tokens)
    plan = token_exchange.RowPlan(ranks, "cpu")
    sent = [token_exchange.pack(x, owner[i], slot[i], w, plan, C) for x, i, w in zip(xs, ids, ws)]
    received = _exchange_in_process([s.block_MW for s in sent])
    partials, handles = [], []
    for r in range(ranks):
        routed = token_exchange.unpack(received[r], D, torch.float32, K, X, sent[r], ws[r], torch.arange(X + 1))
        valid = int(routed.counts_E.sum())
        assert routed.expert_N[:valid].tolist() == sorted(routed.expert_N[:valid].tolist())
        assert (routed.expert_N[valid:] == X).all()
        global_N = torch.tensor(placement.rank_experts[r])[routed.expert_N[:valid]]
        y = torch.full_like(routed.x_ND, float("nan"))
        y[:valid] = routed.x_ND[:valid] * scale_E[global_N][:, None]
        partials.append(token_exchange.partial_sums(y, routed.handle, K))
        handles.append(routed.handle)
    back = _exchange_in_process(partials)
    for r in range(ranks):
        home = token_exchange.home_buffer(back[r])
        home[:-1] = back[r]
        got = token_exchange.gather_home(home, handles[r], torch.float32)
        local = LocalDispatcher.identity(E)
        d = local.dispatch(xs[r], ids[r], ws[r])
        want = local.combine(d.x_ND * scale_E[d.expert_N][:, None], d.handle)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_fixed_capacity_refuses_more_tokens_than_announced():
    from expertmesh.router.all_to_all import AllToAllDispatcher

    class OneRank:
        rank, world_size = 0, 1

        def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None):
            output.copy_(input)

    d = AllToAllDispatcher(torch.zeros(4, dtype=torch.int64), torch.arange(4), 4, OneRank())
    d.supports_fixed_capacity = True
    d.begin_step(2, 2, hidden_size=8, dtype=torch.float32)
    assert d.capacity == 2
    with pytest.raises(ValueError, match="over this step's announced capacity of 2"):
        d.dispatch(torch.zeros(3, 8), torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2))
    d.begin_step(10**9, 8, hidden_size=4096, dtype=torch.bfloat16)  # too large for the byte cap
    assert d.capacity is None


def test_graphs_are_captured_only_for_sizes_with_a_fixed_capacity():
    """A size past the byte cap would take the exact-split exchange, whose sizes the host reads:
    it is left out of the capture (the runner's `capture_graphs`); none at all without
    `supports_fixed_capacity`."""
    from expertmesh.engine.model_runner import fixed_capacity_sizes
    from expertmesh.router.all_to_all import AllToAllDispatcher

    class TwoRanks:
        rank, world_size = 0, 2

        def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None):
            raise AssertionError("not called")

    d = AllToAllDispatcher(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), 2, TwoRanks())
    shape = {"hidden_size": 4096, "dtype": torch.bfloat16}
    assert fixed_capacity_sizes(d, [1, 8, 256], 8, shape) == []
    d.supports_fixed_capacity = True
    per_token = token_exchange.exchange_bytes(2, 1, 4096, torch.bfloat16, 8)
    d.max_exchange_bytes = 100 * per_token
    assert fixed_capacity_sizes(d, [1, 8, 64, 100, 101, 256], 8, shape) == [1, 8, 64, 100]
