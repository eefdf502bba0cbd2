"""`LoadBalancer`: the executor's side of EPLB, the state between checks. No Ray, no collective.

It holds the per-layer layouts in force (router/eplb.py), the expert-load counters as read at the
last check (the ranks' counters only grow: a window is the difference of two reads) and the steps
since. Every `eplb_interval` steps the executor asks `plan(load)`; a MoE layer gets a new layout
only when its ranks' max/mean load over the window is at least `eplb_min_imbalance` and the new
layout predicts less; `None` when no layer changes (no call to the ranks at all).
"""
from __future__ import annotations

import torch

from expertmesh.engine.config import ParallelConfig
from expertmesh.router.eplb import check_shape, imbalance, initial_layout, rank_loads, rebalance


class LoadBalancer:
    def __init__(self, parallel: ParallelConfig, num_experts: int, num_moe_layers: int) -> None:
        self.ep_size, self.num_redundant = parallel.ep_size, parallel.num_redundant_experts
        self.interval, self.threshold = parallel.eplb_interval, parallel.eplb_min_imbalance
        self.slots_per_rank = check_shape(num_experts, self.ep_size, self.num_redundant)
        self.num_experts, self.num_moe_layers = num_experts, num_moe_layers
        self.rebalances = 0
        self.last: dict | None = None
        """The last check: per layer the imbalance measured before it and predicted after, whether moved."""
        self.reset()

    def reset(self) -> None:
        """A fresh group: the initial layout everywhere, counters from zero."""
        self.layouts_LP = (initial_layout(self.num_experts, self.ep_size, self.num_redundant),) * self.num_moe_layers
        self.seen_LE: torch.Tensor | None = None
        self.steps = 0

    def due(self) -> bool:
        return self.interval > 0 and self.steps >= self.interval

    def window(self, load_LE: torch.Tensor) -> torch.Tensor:
        """The load since the last check (all of it before the first; a reset group's counters restart)."""
        if self.seen_LE is None or self.seen_LE.shape != load_LE.shape or bool((load_LE < self.seen_LE).any()):
            return load_LE
        return load_LE - self.seen_LE

    def plan(self, load_LE: torch.Tensor) -> tuple[tuple[int, ...], ...] | None:
        """The layouts to switch to for the load counted so far [L, E], or None to keep them."""
        window = self.window(load_LE)
        self.seen_LE, self.steps = load_LE.clone(), 0
        proposal = rebalance(window.tolist(), self.ep_size, self.num_redundant, self.layouts_LP)
        layouts = tuple(new if before >= self.threshold and after < before else cur
                        for new, cur, before, after in zip(proposal.slot_expert_LP, self.layouts_LP,
                                                           proposal.before_L, proposal.after_L))
        moved = layouts != self.layouts_LP
        self.last = {"before": proposal.before_L, "after": proposal.after_L, "moved": moved}
        return layouts if moved else None

    def switched(self, layouts_LP: tuple[tuple[int, ...], ...]) -> None:
        self.layouts_LP = layouts_LP
        self.rebalances += 1

    def rank_imbalance(self, load_LE: torch.Tensor) -> list[float]:
        """Per layer, max/mean rank load of `load_LE` under the layouts in force."""
        return [imbalance(rank_loads(row, layout, self.ep_size))
                for row, layout in zip(load_LE.tolist(), self.layouts_LP)]

    def report(self, load_LE: torch.Tensor) -> dict:
        """For /metrics: the ranks' max/mean load per layer since the last check, and the rebalances."""
        return {"rank_imbalance": self.rank_imbalance(self.window(load_LE)), "rebalances": self.rebalances}
