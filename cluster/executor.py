"""`RayExecutor`: an EP group of `RankWorker` actors behind the engine's `Executor` protocol.

    placement group, one bundle per rank (a GPU each on CUDA), gang-scheduled: all or nothing
      -> one RankWorker per bundle -> rendezvous (rank 0 picks a free port) -> load
    every step: one message to all ranks, one reply from each; never a call per layer or per
      token. The default channel is a Ray Compiled Graph (InputNode -> every rank's execute ->
      MultiOutputNode), compiled once per group: shared-memory channels, no task submission per
      step. The plain channel ("ray_call") puts the plan in the object store once and calls each
      rank with a reference to it.

With the load balancer (`num_redundant_experts`, `eplb_interval`), every `eplb_interval` steps
`execute` first checks the expert load (cluster/balancer.py) and, where it pays, switches every
rank to new per-layer layouts in one call (`RankWorker.rebalance`) before sending the step.

A rank that dies or a step that outlives `step_timeout_s` takes the whole group down (the
others would wait in their collectives forever): the group is killed at once and
`ExecutorDiedError` tells the core, which fails the requests in flight and calls `restart()`.
"""
from __future__ import annotations

import logging
import time

import torch

from expertmesh.cluster.balancer import LoadBalancer
from expertmesh.cluster.bootstrap import NCCL_ENV, check_placeable, ensure_ray, wait_for_placement
from expertmesh.cluster.placement import ExpertPlacement, rank_bundles
from expertmesh.cluster.worker import RankWorker
from expertmesh.engine.config import EngineConfig
from expertmesh.engine.executor import ExecutorDiedError
from expertmesh.engine.model_files import model_dir
from expertmesh.engine.step import StepPlan, StepResult
from expertmesh.model.config import ModelConfig
from expertmesh.router.eplb import imbalance

log = logging.getLogger(__name__)


class RayExecutor:
    def __init__(self, config: EngineConfig, placement_group=None, bundle_offset: int = 0) -> None:
        """With `placement_group` given (a Ray Serve replica's own, from its
        `placement_group_bundles`), rank r runs in bundle `bundle_offset + r` of it and the group
        never creates or removes a placement group itself: the replica and its ranks are
        gang-scheduled together, and Serve adds or removes whole EP groups."""
        self.config = config
        self._own_placement_group = placement_group is None
        self._bundle_offset = bundle_offset
        self.num_ranks = config.parallel.ep_size
        self.model_config = ModelConfig.from_pretrained(model_dir(config.load))
        if not self.model_config.is_moe:
            raise ValueError(f"ep_size > 1 needs a Mixture-of-Experts model; {self.model_config.model_type} is dense")
        self.placement = ExpertPlacement.contiguous(self.model_config.num_experts, self.num_ranks)
        self.balancer = (LoadBalancer(config.parallel, self.model_config.num_experts, len(self.model_config.moe_layers))
                         if config.parallel.eplb else None)  # shapes that do not divide fail here, before any actor
        self.workers: list = []
        self.placement_group = placement_group
        self._graph = None
        self.control_seconds = 0.0
        self.num_steps = 0
        self._start()

    # ---- group lifecycle --------------------------------------------------------------------

    def _device_type(self) -> str:
        import ray

        requested = self.config.load.device
        if requested == "auto":
            return "cuda" if ray.cluster_resources().get("GPU", 0) >= self.num_ranks else "cpu"
        return torch.device(requested).type

    def _start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        parallel = self.config.parallel
        ensure_ray(parallel.ray_address)
        device_type = self._device_type()
        bundles = rank_bundles(self.num_ranks, device_type, parallel.cpus_per_rank)
        what = f"an EP group of {self.num_ranks} {device_type.upper()} ranks"
        if self._own_placement_group:
            check_placeable(what, bundles)
            self.placement_group = placement_group(bundles, strategy="PACK")
        else:
            specs = self.placement_group.bundle_specs[self._bundle_offset:]
            if len(specs) < self.num_ranks:
                raise ValueError(f"the placement group has {len(specs)} bundles from index {self._bundle_offset}; "
                                 f"an EP group of {self.num_ranks} ranks needs one per rank")
            bundles = [{"CPU": spec.get("CPU", 0), "GPU": spec.get("GPU", 0)} for spec in specs[:self.num_ranks]]
        try:
            wait_for_placement(self.placement_group, what, bundles, parallel.placement_timeout_s)
        except ValueError:
            self._kill()
            raise
        layouts = None
        if self.balancer is not None:  # a fresh group loads the initial layout from the checkpoint again
            self.balancer.reset()
            layouts = self.balancer.layouts_LP
        actor = ray.remote(RankWorker)
        self.workers = [
            actor.options(
                num_cpus=bundles[r]["CPU"], num_gpus=bundles[r].get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=self._bundle_offset + r),
                runtime_env={"env_vars": dict(NCCL_ENV)},
            ).remote(r, self.config, self.placement, device_type, layouts)
            for r in range(self.num_ranks)
        ]
        try:
            address, port = ray.get(self.workers[0].rendezvous_address.remote(), timeout=parallel.startup_timeout_s)
            ray.get([w.init_group.remote(address, port) for w in self.workers], timeout=parallel.startup_timeout_s)
            infos = ray.get([w.load.remote() for w in self.workers], timeout=parallel.startup_timeout_s)
            if parallel.step_channel == "compiled":
                from ray.dag import InputNode, MultiOutputNode

                with InputNode() as plan:
                    graph = MultiOutputNode([w.execute.bind(plan) for w in self.workers])
                self._graph = graph.experimental_compile()
        except Exception:
            self._kill()  # nothing of a group that did not start may keep holding GPUs
            raise
        self.num_blocks = min(info["num_blocks"] for info in infos)
        self.expert_params = [info["expert_params"] for info in infos]
        self.fp8_weights = [info["fp8_weights"] for info in infos]  # per rank: ModelRunner.fp8_weights
        log.info("EP group of %d ranks on %s ready", self.num_ranks, device_type)

    def _kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for worker in self.workers:  # first: a graph's teardown waits for ranks stuck in a collective
            ray.kill(worker, no_restart=True)
        self.workers = []
        if self._graph is not None:
            try:
                self._graph.teardown()
            except Exception:
                log.debug("compiled graph teardown after kill", exc_info=True)
            self._graph = None
        if self.placement_group is not None and self._own_placement_group:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def restart(self) -> None:
        self._kill()
        self._start()

    def shutdown(self) -> None:
        """Stop the group in order: the graph's loops, the process groups, then the actors."""
        import ray

        try:
            if self._graph is not None:
                self._graph.teardown()
                self._graph = None
            if self.workers:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
        except Exception:
            log.warning("EP group did not shut down cleanly; killing it", exc_info=True)
        finally:
            self._kill()

    # ---- steps ----------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepResult:
        import ray

        start = time.perf_counter()
        if not self.workers:
            raise ExecutorDiedError("no EP group is running (its restart failed)")
        if self.balancer is not None and self.balancer.due():
            self.check_balance()
        if self._graph is not None:
            try:
                refs = self._graph.execute(plan)
            except Exception as exc:  # a rank died between steps: the graph's channels are closed
                self._kill()
                raise ExecutorDiedError(f"rank failed: {type(exc).__name__}: {exc}") from exc
            results = self._gather_compiled(refs)
        else:
            plan_ref = ray.put(plan)
            results = self._gather([w.execute.remote(plan_ref) for w in self.workers])
        result = StepResult.merge(results)
        self.control_seconds += time.perf_counter() - start - result.compute_seconds
        self.num_steps += 1
        if self.balancer is not None:
            self.balancer.steps += 1
        return result

    def check_balance(self) -> bool:
        """Between two steps: read the expert load (one gather), and where the ranks' load is uneven
        move experts to the new layouts (one call to every rank at once). Whether it moved any."""
        try:  # a dead or hung rank: the group is replaced and its requests resume, as for a step
            load = torch.stack(self._gather([w.expert_load.remote() for w in self.workers])).sum(dim=0)
        finally:
            self.balancer.steps = 0  # checked (or failed): the next check is `eplb_interval` steps on
        layouts = self.balancer.plan(load)
        if layouts is None:
            return False
        try:  # fail-fast: one rank's failure must not leave the others waiting in their transfers
            self._gather([w.rebalance.remote(layouts) for w in self.workers])
        except ExecutorDiedError as exc:  # the ranks may hold half-moved weights: the group is replaced
            # and the balancer stops, so that a move that cannot succeed (memory, shapes) does not
            # replace the group again every interval
            self.balancer.interval = 0
            log.error("rebalancing the experts failed (%s); the load balancer is off for this engine", exc)
            raise ExecutorDiedError(f"rebalancing the experts failed: {exc}") from exc
        self.balancer.switched(layouts)
        return True

    def load_report(self, load: torch.Tensor) -> dict:
        """For /metrics: per MoE layer the busiest rank's load over the mean (the load since the
        last balancer check under the layout in force), and the rebalances so far."""
        if self.balancer is not None:
            return self.balancer.report(load)
        owner = torch.tensor(self.placement.owner_E)
        per_rank = torch.zeros(load.shape[0], self.num_ranks, dtype=torch.float64)
        per_rank.index_add_(1, owner, load.double())
        return {"rank_imbalance": [imbalance(row) for row in per_rank.tolist()], "rebalances": 0}

    def _gather(self, futures: list) -> list:
        """Every rank's reply, or ExecutorDiedError as soon as one rank fails or the step hangs."""
        import ray

        deadline = time.monotonic() + self.config.parallel.step_timeout_s
        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                self._kill()
                raise ExecutorDiedError(f"a step took longer than {self.config.parallel.step_timeout_s:.0f} s")
            try:
                ray.get(ready[0])
            except Exception as exc:
                self._kill()
                raise ExecutorDiedError(f"rank failed: {type(exc).__name__}: {exc}") from exc
        return ray.get(futures)

    def _gather_compiled(self, refs: list) -> list:
        """A compiled graph's replies; a dead rank makes every ref raise at once."""
        import ray

        deadline = time.monotonic() + self.config.parallel.step_timeout_s
        results = []
        try:
            for ref in refs:
                results.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 0)))
        except Exception as exc:
            self._kill()
            raise ExecutorDiedError(f"rank failed: {type(exc).__name__}: {exc}") from exc
        return results

    def _call_all(self, method: str, *args) -> list:
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in self.workers],
                       timeout=self.config.parallel.step_timeout_s)

    def expert_load(self) -> torch.Tensor | None:
        loads = self._call_all("expert_load")
        return torch.stack(loads).sum(dim=0)

    def stage_seconds(self) -> list[dict[str, float]]:
        """Each rank's seconds in all-to-alls and MoE layers since the last call (with time_collectives)."""
        return self._call_all("stage_seconds")

    def profile_window(self, steps: int = 0) -> list[dict | None]:
        """Benchmarks: open (`steps` 0) or close every rank's device profiling window; each rank's summary."""
        return self._call_all("profile_window", steps)

    def skew_router(self, hot: list[int], sources_L: list[list[int]], factor: float) -> None:
        """Benchmarks: skew the routing of every rank the same way (`RankWorker.skew_router`)."""
        self._call_all("skew_router", hot, sources_L, factor)

    def ping_seconds(self, repeats: int = 20) -> float:
        """Median round trip of an empty call to every rank at once (the control path's floor)."""
        import statistics

        import ray

        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            ray.get([w.ping.remote() for w in self.workers])
            times.append(time.perf_counter() - start)
        return statistics.median(times)
