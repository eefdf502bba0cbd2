"""The load balancer's arithmetic (router/eplb.py), its state between checks (cluster/balancer.py),
the dispatcher's replica tables and the settings: no Ray, no process group."""
from __future__ import annotations

import random

import pytest
import torch

from expertmesh.cluster.balancer import LoadBalancer
from expertmesh.engine.config import ParallelConfig
from expertmesh.router.all_to_all import ReplicaTables
from expertmesh.router.eplb import (
    Transfer,
    check_shape,
    copies_of,
    imbalance,
    initial_layout,
    rank_loads,
    rebalance,
    replica_tables,
    transfers,
)


def _skewed(num_experts: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    hot = rng.sample(range(num_experts), 3)
    return [rng.randint(0, 50) + (1000 * (3 - hot.index(e)) if e in hot else 0) for e in range(num_experts)]


def test_redundant_copies_go_to_the_hot_experts():
    load = [10] * 12
    load[4], load[9] = 300, 120
    copies = copies_of(load, 15)
    assert sum(copies) == 15 and min(copies) == 1
    assert copies[4] == 3 and copies[9] == 2  # 300 -> 150 a copy, 120 -> 60, then 150 -> 100
    assert [e for e, c in enumerate(copies) if c > 1] == [4, 9]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("num_experts, ep_size, redundant", [(12, 3, 3), (8, 2, 2), (16, 4, 4), (12, 3, 0)])
def test_every_expert_keeps_a_copy_and_the_balance_improves(seed, num_experts, ep_size, redundant):
    load = _skewed(num_experts, seed)
    plan = rebalance([load, list(reversed(load))], ep_size, redundant)
    slots = check_shape(num_experts, ep_size, redundant)
    for layer_load, layout, before, after in zip([load, list(reversed(load))], plan.slot_expert_LP,
                                                 plan.before_L, plan.after_L):
        assert len(layout) == slots * ep_size and sorted(set(layout)) == list(range(num_experts))
        assert after <= before
        assert after == pytest.approx(imbalance(rank_loads(layer_load, layout, ep_size)))
        for r in range(ep_size):  # no two copies of an expert on one rank (here always avoidable)
            mine = layout[r * slots:(r + 1) * slots]
            assert len(set(mine)) == len(mine)
        if redundant and before > 1.3:  # copies of the hot experts: not always even (whole copies), but closer
            assert after < before


def test_the_skewed_case_of_the_must_show_balances():
    load = [0] * 12
    load[3], load[4], load[5] = 900, 600, 300  # 3 and 4 on rank 0, 5 on rank 1 in the initial layout
    plan = rebalance([load], ep_size=3, num_redundant=3)
    assert plan.before_L[0] == pytest.approx(2.5) and plan.after_L[0] == pytest.approx(1.0)
    assert copies_of(load, 15, 3)[3:6] == [3, 2, 1]  # 300 tokens a copy everywhere


def test_a_layout_that_is_already_balanced_stays_where_it_is():
    load = _skewed(12, 7)
    first = rebalance([load], 3, 3).slot_expert_LP
    again = rebalance([load], 3, 3, current_LP=first)
    assert again.slot_expert_LP == first and transfers(first, again.slot_expert_LP, 5) == []


def test_relabelling_keeps_experts_on_their_ranks():
    """A layout whose ranks are permuted needs no move at all: the packed ranks take the current labels."""
    load = _skewed(12, 3)
    layout = rebalance([load], 3, 3).slot_expert_LP[0]
    rotated = layout[5:] + layout[:5]  # rank 0's experts now on rank 2, and so on
    again = rebalance([load], 3, 3, current_LP=[rotated]).slot_expert_LP[0]
    assert again == rotated


def test_an_expert_has_at_most_one_copy_a_rank():
    assert copies_of([100, 1, 1, 1], 6, max_copies=2) == [2, 2, 1, 1]
    layout = rebalance([[100, 1, 1, 1]], ep_size=2, num_redundant=2).slot_expert_LP[0]
    assert layout.count(0) == 2 and len(set(layout[:3])) == 3 and len(set(layout[3:])) == 3


def test_transfers_read_local_copies_first_and_spread_remote_reads():
    old = [(0, 1, 2, 3, 4, 5)]
    new = [(0, 0, 2, 3, 0, 0)]  # S = 3: rank 0 slot 1 has a local 0; rank 1 slots 4, 5 read 0 from rank 0
    assert transfers(old, new, 3) == [Transfer(0, 0, 1), Transfer(0, 0, 4), Transfer(0, 0, 5)]
    old = [(0, 1, 0, 3, 4, 5)]  # two holders of 0 (slots 0 and 2): the remote reads alternate
    new = [(0, 1, 0, 3, 0, 0)]
    assert transfers(old, new, 3) == [Transfer(0, 0, 4), Transfer(0, 2, 5)]


@pytest.mark.parametrize("bad, message", [
    ([[1, -2, 3, 4]], "non-negative"),
    ([[1, float("nan"), 3, 4]], "finite"),
    ([[1, float("inf"), 3, 4]], "finite"),
    ([[1, 2, 3, 4], [1, 2]], "as many experts"),
    ([], "non-empty"),
    ([[]], "non-empty"),
    ([["a", 2, 3, 4]], "table of numbers"),
    (None, "table of numbers"),
])
def test_hostile_loads_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        rebalance(bad, 2, 0)


@pytest.mark.parametrize("args, message", [
    ((12, 3, 2), r"14 slots do not divide evenly over 3 ranks; choose num_redundant_experts from \[0, 3\]"),
    ((12, 3, 25), "at most 24"),
    ((12, 3, -1), ">= 0"),
    ((12, 3, 1.5), "must be an integer"),
    ((12, 3, "3"), "must be an integer"),
    ((12, 3, None), "must be an integer"),
    ((12, 3, 10**30), "at most 24"),
    ((2, 4, 0), "do not divide"),
])
def test_shapes_that_do_not_fit_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        check_shape(*args)


def test_a_current_layout_that_loses_an_expert_is_refused():
    with pytest.raises(ValueError, match="every one of the 4 experts"):
        rebalance([[1, 2, 3, 4]], 2, 2, current_LP=[(0, 1, 2, 0, 1, 2)])


def test_replica_tables_route_each_token_to_one_copy_and_update_in_place():
    layout = (0, 1, 2, 3, 0, 1)  # S = 3: expert 0 at slots 0 and 4, expert 1 at 1 and 5
    tables = ReplicaTables([layout], num_experts=4, max_copies=3, device="cpu")
    assert tables.copies_LEC[0].tolist() == [[0, 4, 0], [1, 5, 1], [2, 2, 2], [3, 3, 3]]
    ids = torch.tensor([[0, 2], [0, 3], [0, 1], [0, 1]])
    # token t's copy of an expert with c copies: (t + rank) mod c
    assert tables.physical_slots(0, ids, rank=0).tolist() == [0, 2, 4, 3, 0, 1, 4, 5]
    assert tables.physical_slots(0, ids, rank=1).tolist() == [4, 2, 0, 3, 4, 5, 0, 1]
    before = tables.copies_LEC.data_ptr(), tables.num_copies_LE.data_ptr()
    tables.update([(3, 3, 2, 1, 0, 3)])
    assert (tables.copies_LEC.data_ptr(), tables.num_copies_LE.data_ptr()) == before  # graphs keep reading these
    assert tables.num_copies_LE.tolist() == [[1, 1, 1, 3]]
    assert tables.physical_slots(0, torch.tensor([[3], [3], [3], [3]]), rank=0).tolist() == [0, 1, 5, 0]
    with pytest.raises(ValueError, match="1 to 3 copies"):
        replica_tables((0, 0, 0, 0, 1, 2), 4, 3)  # expert 3 lost


def _balancer(interval=4, threshold=1.1, redundant=3):
    return LoadBalancer(ParallelConfig(ep_size=3, num_redundant_experts=redundant, eplb_interval=interval,
                                       eplb_min_imbalance=threshold), num_experts=12, num_moe_layers=2)


def test_the_balancer_checks_every_interval_over_the_window_since_the_last_check():
    b = _balancer()
    assert not b.due()
    b.steps = 4
    assert b.due()
    skewed = torch.zeros(2, 12, dtype=torch.int64)
    skewed[:, 3:6] = torch.tensor([900, 600, 300])  # 3 and 4 on rank 0, 5 on rank 1
    skewed[1] = skewed[1].roll(6)  # layer 1's hot experts are 9-11: 9 on rank 1, 10 and 11 on rank 2
    layouts = b.plan(skewed)
    assert layouts is not None and layouts != b.layouts_LP and b.steps == 0
    assert b.last["before"] == pytest.approx((2.5, 1.5)) and max(b.last["after"]) < 1.2
    b.switched(layouts)
    assert b.rebalances == 1 and max(b.rank_imbalance(skewed)) < 1.2
    # The counters only grow: the next window is what came since, here an even load: nothing moves.
    even = skewed + 100
    assert b.plan(even) is None and b.last["moved"] is False
    assert b.report(even)["rank_imbalance"] == pytest.approx([1.0, 1.0]) and b.report(even)["rebalances"] == 1


def test_the_balancer_skips_layers_under_the_threshold():
    b = _balancer(threshold=3.5)  # the skew gives 3.0: under it
    load = torch.zeros(2, 12, dtype=torch.int64)
    load[:, 3:5] = 100  # both on rank 0: 200 of a mean of 66.7
    assert b.plan(load) is None and b.last["before"][0] == pytest.approx(3.0)
    b = _balancer(threshold=1.0)
    assert b.plan(torch.zeros(2, 12, dtype=torch.int64)) is None  # idle: nothing to balance


def test_the_balancer_refuses_shapes_at_start_up():
    with pytest.raises(ValueError, match="do not divide evenly"):
        _balancer(redundant=1)


@pytest.mark.parametrize("field", ["num_redundant_experts", "eplb_interval"])
@pytest.mark.parametrize("bad, message", [(-1, ">= 0"), (1.5, "whole number"), ("3", "whole number"),
                                          (None, "whole number"), (True, "whole number")])
def test_eplb_counts_refuse_hostile_values(field, bad, message):
    with pytest.raises(ValueError, match=f"{field} must be (a )?{message}"):
        ParallelConfig(ep_size=2, **{field: bad})


@pytest.mark.parametrize("bad", [0.5, -1, float("nan"), "high", None, True])
def test_eplb_min_imbalance_refuses_hostile_values(bad):
    with pytest.raises(ValueError, match="eplb_min_imbalance must be"):
        ParallelConfig(ep_size=2, eplb_min_imbalance=bad)


def test_eplb_needs_an_ep_group():
    for kwargs in (dict(num_redundant_experts=3), dict(eplb_interval=10)):
        with pytest.raises(ValueError, match="need ep_size > 1"):
            ParallelConfig(**kwargs)
    assert not ParallelConfig(ep_size=2).eplb and ParallelConfig(ep_size=2, eplb_interval=10 ** 30).eplb


def test_the_served_app_refuses_hostile_eplb_values(qwen3_moe_path):
    from pydantic import ValidationError

    from expertmesh.gateway.app_config import AppConfig

    for key, bad in (("num_redundant_experts", -1), ("num_redundant_experts", 1.5), ("eplb_interval", "often"),
                     ("eplb_interval", None), ("eplb_min_imbalance", 0.9), ("eplb_min_imbalance", "x")):
        with pytest.raises((ValidationError, ValueError), match=key):
            AppConfig.model_validate({"model": str(qwen3_moe_path), "ep_size": 2, key: bad})


def test_initial_layout_spreads_copies():
    assert initial_layout(12, 3, 3) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2)


def test_metrics_show_per_layer_load_rank_imbalance_and_rebalances():
    from expertmesh.gateway.metrics import Metrics

    metrics = Metrics()
    metrics.observe_engine({}, {"expert_load": [[3, 1], [0, 0]], "rank_imbalance": [1.5, 1.0], "rebalances": 2})
    text = metrics.render().decode()
    assert 'expertmesh_expert_load_imbalance{layer="0"} 1.5' in text
    assert 'expertmesh_expert_routed_tokens_total{expert="0",layer="0"} 3.0' in text
    assert 'expertmesh_expert_rank_load_imbalance{layer="0"} 1.5' in text
    assert "expertmesh_eplb_rebalances_total 2.0" in text
    metrics.observe_engine({}, [[3, 1], [0, 0]])  # the bare table of an older engine still reads
    text = metrics.render().decode()
    assert 'expertmesh_expert_load_imbalance{layer="0"} 1.5' in text and "eplb_rebalances" not in text
    metrics.observe_engine({}, None)
    assert "expert_load" not in metrics.render().decode()
