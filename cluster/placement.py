"""Placement: which rank owns which expert, and what each rank reserves. Pure functions, no Ray.

The table is data, not a formula in the forward: the load balancer will rewrite it later.

Worked example, 8 experts over 3 ranks (the first E % R ranks take one more):

    >>> p = ExpertPlacement.contiguous(num_experts=8, ep_size=3)
    >>> p.rank_experts
    ((0, 1, 2), (3, 4, 5), (6, 7))
    >>> p.owner_E, p.slot_E
    ((0, 0, 0, 1, 1, 1, 2, 2), (0, 1, 2, 0, 1, 2, 0, 1))
    >>> rank_bundles(3, "cuda", cpus_per_rank=2)
    [{'CPU': 2, 'GPU': 1}, {'CPU': 2, 'GPU': 1}, {'CPU': 2, 'GPU': 1}]
    >>> rank_bundles(4, "cpu")  # half a CPU each by default: four CPU ranks fit on two cores
    [{'CPU': 0.5}, {'CPU': 0.5}, {'CPU': 0.5}, {'CPU': 0.5}]

Whether bundles can be placed at all, against each node's total resources:

    >>> unplaceable([{"CPU": 64}, {"CPU": 64}], [{"CPU": 2.0}])
    'CPU: 128 asked in all, the cluster has 2 (a bundle needs up to 64 on one node, the largest node has 2)'
    >>> unplaceable([{"CPU": 0.5}] * 4, [{"CPU": 2.0}]) is None
    True
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    rank_experts: tuple[tuple[int, ...], ...]
    """Global expert ids each rank owns, in local-slot order."""

    def __post_init__(self) -> None:
        owned = sorted(e for experts in self.rank_experts for e in experts)
        if owned != list(range(self.num_experts)):
            raise ValueError(f"a placement must give each of the {self.num_experts} experts to exactly one rank")

    @classmethod
    def contiguous(cls, num_experts: int, ep_size: int) -> ExpertPlacement:
        if ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {ep_size}")
        if num_experts < ep_size:
            raise ValueError(f"{num_experts} experts cannot be spread over {ep_size} ranks")
        base, extra = divmod(num_experts, ep_size)
        ranks, start = [], 0
        for r in range(ep_size):
            n = base + (1 if r < extra else 0)
            ranks.append(tuple(range(start, start + n)))
            start += n
        return cls(num_experts, tuple(ranks))

    @property
    def ep_size(self) -> int:
        return len(self.rank_experts)

    @property
    def max_local_experts(self) -> int:
        return max(len(experts) for experts in self.rank_experts)

    @property
    def owner_E(self) -> tuple[int, ...]:
        """Rank owning each global expert."""
        owner = [0] * self.num_experts
        for rank, experts in enumerate(self.rank_experts):
            for e in experts:
                owner[e] = rank
        return tuple(owner)

    @property
    def slot_E(self) -> tuple[int, ...]:
        """Local slot of each global expert on its owner."""
        slot = [0] * self.num_experts
        for experts in self.rank_experts:
            for i, e in enumerate(experts):
                slot[e] = i
        return tuple(slot)


CPU_RANK_CPUS, GPU_RANK_CPUS = 0.5, 1
"""CPUs a rank reserves when cpus_per_rank is not given: a GPU rank feeds its GPU from one core; a CPU
rank's share is a fraction, so an EP group of a few ranks fits on a small machine (Ray's CPU is a
logical unit for scheduling; the rank's torch threads are set apart from it)."""


def rank_cpus(device_type: str, cpus_per_rank: float | None = None) -> float:
    """The CPUs one rank reserves: `cpus_per_rank`, or the device's default."""
    if cpus_per_rank is not None:
        return cpus_per_rank
    return GPU_RANK_CPUS if device_type == "cuda" else CPU_RANK_CPUS


def rank_bundles(ep_size: int, device_type: str, cpus_per_rank: float | None = None) -> list[dict[str, float]]:
    """One placement-group bundle per rank: a GPU each on CUDA, CPUs only on the CPU."""
    bundle: dict[str, float] = {"CPU": rank_cpus(device_type, cpus_per_rank)}
    if device_type == "cuda":
        bundle["GPU"] = 1
    return [dict(bundle) for _ in range(ep_size)]


def unplaceable(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> str | None:
    """Why `bundles` can never be placed on nodes with these total resources, or None when they may be:
    a resource asked for beyond the cluster's total, or a bundle larger than every node (one bundle
    lives on one node). Necessary conditions only: None does not promise that packing succeeds."""
    reasons = []
    for resource in sorted({r for bundle in bundles for r in bundle}):
        asked = sum(bundle.get(resource, 0) for bundle in bundles)
        have = sum(node.get(resource, 0) for node in nodes)
        largest_ask = max(bundle.get(resource, 0) for bundle in bundles)
        largest_node = max((node.get(resource, 0) for node in nodes), default=0)
        if asked > have or largest_ask > largest_node:
            reasons.append(f"{resource}: {asked:g} asked in all, the cluster has {have:g} (a bundle needs up to "
                           f"{largest_ask:g} on one node, the largest node has {largest_node:g})")
    return "; ".join(reasons) or None
