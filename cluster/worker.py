"""`RankWorker`: one rank of an EP group, a Ray actor holding a model runner over its experts.

Lifecycle, driven by the Ray executor: `rendezvous_address()` (rank 0 only) -> `init_group()`
on every rank at once -> `load()` -> `execute(plan)` once per step -> `shutdown()`; with the load
balancer, `rebalance(layouts)` on every rank at once between two steps.
"""
from __future__ import annotations

import torch

from expertmesh.cluster.collective import ProcessGroupAllToAll, free_port, host_address, init_process_group
from expertmesh.cluster.placement import ExpertPlacement, rank_cpus
from expertmesh.cluster.rebalance import move_experts
from expertmesh.engine.config import EngineConfig
from expertmesh.engine.device_profile import WindowSlot
from expertmesh.engine.model_runner import ModelRunner
from expertmesh.engine.step import StepPlan, StepResult
from expertmesh.model.moe import SparseMoeBlock
from expertmesh.router.all_to_all import AllToAllDispatcher, ReplicaTables
from expertmesh.router.eplb import transfers
from expertmesh.router.timing import StageTimer


class RankWorker:
    def __init__(self, rank: int, config: EngineConfig, placement: ExpertPlacement, device_type: str,
                 layouts_LP: tuple[tuple[int, ...], ...] | None = None) -> None:
        """`layouts_LP`: with the load balancer (router/eplb.py), the expert of every physical slot of
        every MoE layer (the same for every layer at start); `placement` is then unused."""
        self.rank = rank
        self.config = config
        self.placement = placement
        self.layouts_LP = layouts_LP
        if device_type == "cuda":
            # Ray gives each rank one GPU through CUDA_VISIBLE_DEVICES: it is device 0 here.
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, round(rank_cpus("cpu", config.parallel.cpus_per_rank))))
        self.runner: ModelRunner | None = None
        self.timer = StageTimer() if config.parallel.time_collectives else None
        self.profile = WindowSlot()

    def rendezvous_address(self) -> tuple[str, int]:
        return host_address(), free_port()

    def init_group(self, address: str, port: int) -> None:
        init_process_group(self.rank, self.placement.ep_size, address, port, self.device.type,
                           timeout_s=self.config.parallel.step_timeout_s)

    def load(self, progress: bool = False) -> dict:
        owner_E = torch.tensor(self.placement.owner_E, device=self.device)
        slot_E = torch.tensor(self.placement.slot_E, device=self.device)
        experts = list(self.placement.rank_experts[self.rank])
        replicas = None
        if self.layouts_LP is not None:
            experts = list(self._rank_slots(self.layouts_LP[0]))
            if any(self._rank_slots(layout) != tuple(experts) for layout in self.layouts_LP):
                raise ValueError("a rank loads one set of experts for every layer: start from one layout")
            replicas = ReplicaTables(self.layouts_LP, self.placement.num_experts,
                                     1 + self.config.parallel.num_redundant_experts, self.device)
            owner_E = torch.full_like(owner_E, -1)  # the replica tables route instead
        dispatcher = AllToAllDispatcher(owner_E, slot_E, len(experts), ProcessGroupAllToAll(), self.timer, replicas)
        self.runner = ModelRunner(self.config.load, self.config.cache, scheduler=self.config.scheduler, rank=self.rank,
                                  ep_size=self.placement.ep_size, expert_ids=experts, dispatcher=dispatcher,
                                  device=self.device, progress=progress)
        # Fixed-capacity exchanges need experts that skip the padding rows (grouped_mm, the fused MoE).
        dispatcher.supports_fixed_capacity = all(
            m.stops_at_valid_rows for m in self.runner.model.modules() if isinstance(m, SparseMoeBlock))
        if self.timer is not None:
            attach_moe_timer(self.runner.model, self.timer)
            self.runner.graphs = None  # timed collectives record events per call: a graph would replay stale ones
        self.runner.capture_graphs(progress=progress)
        return {"num_blocks": self.runner.num_blocks, "expert_params": self.expert_param_count(),
                "fp8_weights": self.runner.fp8_weights}

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    def expert_param_count(self) -> int:
        return sum(p.numel() for name, p in self.runner.model.named_parameters() if ".experts." in name)

    def expert_load(self) -> torch.Tensor | None:
        return self.runner.expert_load()

    @property
    def slots_per_rank(self) -> int:
        return len(self.layouts_LP[0]) // self.placement.ep_size

    def _rank_slots(self, layout: tuple[int, ...]) -> tuple[int, ...]:
        S = len(layout) // self.placement.ep_size
        return tuple(layout[self.rank * S:(self.rank + 1) * S])

    def rebalance(self, layouts_LP: tuple[tuple[int, ...], ...]) -> int:
        """Switch to new layouts between two steps, every rank at once: move the experts whose slots
        change (cluster/rebalance.py), then overwrite the dispatcher's tables in place. Returns the
        slots of this rank that were written."""
        if self.layouts_LP is None:
            raise RuntimeError("this EP group was started without the load balancer (num_redundant_experts, "
                               "eplb_interval)")
        plan = transfers(self.layouts_LP, layouts_LP, self.slots_per_rank)
        blocks = sorted((m for m in self.runner.model.modules() if isinstance(m, SparseMoeBlock)),
                        key=lambda m: m.moe_index)
        written = move_experts([b.experts for b in blocks], plan, self.rank, self.slots_per_rank)
        self.runner.model.dispatcher.replicas.update(layouts_LP)
        if self.device.type == "cuda":  # the weights and tables are written before the next step reads
            torch.cuda.synchronize(self.device)  # them (steps run on the compiled graph's own thread)
        self.layouts_LP = layouts_LP
        return written

    def slot_experts(self) -> list[tuple[int, ...]]:
        """Per MoE layer, the logical expert in each of this rank's slots (tests, introspection)."""
        return [self._rank_slots(layout) for layout in self.layouts_LP or ()]

    def stage_seconds(self) -> dict[str, float]:
        """Seconds in all-to-alls and in whole MoE layers since the last call (with time_collectives)."""
        return self.timer.take() if self.timer else {}

    def profile_window(self, steps: int = 0) -> dict | None:
        """Benchmarks: open this rank's device profiling window (`steps` 0), or close it after
        `steps` steps and return its summary (`engine/device_profile.py`). CUDA graphs stay on."""
        return self.profile.toggle(self.device, steps, len(self.runner.model_config.moe_layers))

    def skew_router(self, hot: list[int], sources_L: list[list[int]], factor: float) -> int:
        """Benchmarks: in MoE layer l, the router rows of the `hot` experts become `factor` times the
        rows of `sources_L[l]` (its busiest experts, say): on random weights the hot experts then
        win the top-k where those did, and the load leans to their rank. The layers changed."""
        blocks = sorted((m for m in self.runner.model.modules() if isinstance(m, SparseMoeBlock)),
                        key=lambda m: m.moe_index)
        with torch.no_grad():
            for block, sources in zip(blocks, sources_L):
                block.gate.weight[hot] = factor * block.gate.weight[sources]
        return len(blocks)

    def ping(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def attach_moe_timer(model: torch.nn.Module, timer: StageTimer) -> None:
    """Time every MoE layer's forward as the stage "moe" (forward hooks, CUDA events)."""
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.register_forward_pre_hook(lambda mod, args: timer.start("moe", args[0].device))
            module.register_forward_hook(lambda mod, args, out: timer.stop("moe"))
