"""Expert parallelism without Ray or a process group: placement tables and the dispatch/combine
index arithmetic on hand-worked layouts."""
from __future__ import annotations

import pytest
import torch

from expertmesh.cluster.placement import ExpertPlacement, rank_bundles, unplaceable
from expertmesh.router.all_to_all import padded_positions, plan_receive, plan_receive_padded, plan_send


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


def test_fixed_capacity_positions_and_regrouping():
    # Send side: 2 copies to rank 0, 1 to rank 1, capacity 3 rows per rank -> rows 0, 1 and 3.
    rows = padded_positions(torch.tensor([[1, 1], [1, 0]]), capacity=3, num_copies=3)
    assert rows.tolist() == [0, 1, 3]
    # Receive side, capacity 3: from rank 0 slot 0 x1, slot 1 x1 (rows 0, 1; row 2 padding);
    # from rank 1 slot 1 x2 (rows 3, 4; row 5 padding). Slots of the 6 rows: 0 1 X | 1 1 X.
    recv = plan_receive_padded(torch.tensor([[1, 1], [0, 2]]), capacity=3, num_local_experts=2)
    assert recv.perm_M.tolist() == [0, 1, 3, 4, 2, 5]
    assert recv.expert_M.tolist() == [0, 1, 1, 1, 2, 2]  # 2 = X: padding, after every real row
    assert recv.counts_E.tolist() == [1, 3]
