"""The expert-parallel load balancer (EPLB): where each MoE layer's experts and their redundant copies
live. Pure functions and plain data, no Ray, no collective; `cluster/` moves the weights.

Legend: L MoE layers, E logical experts, R ranks, S slots per rank, P = R*S physical slots
(= E + redundant), C most copies of one expert (1 + redundant). Physical slot p lives on rank
p // S at local slot p % S.

The greedy of DeepSeek's EPLB, written afresh:
  1. replicate: every expert gets one copy; each further slot goes to the expert with the
     largest load per copy (ties: the lower id);
  2. pack: copies heaviest first (load / copies), each onto the least-loaded rank that still has
     a free slot and does not hold that expert yet (where some rank can take it);
  3. keep what stands: the packed ranks are relabelled to the current ranks they share the most
     experts with, and an expert staying on a rank keeps its slot, so fewer weights move.

A rank's load is the tokens of its copies, each expert's tokens split evenly over its copies (the
dispatcher sends a token to copy (token index + rank) mod copies). Worked example, 4 experts over
2 ranks with 2 redundant slots (3 slots a rank), experts 0 and 2 hot:

    >>> copies_of([50, 10, 30, 10], 6)  # the extra copies: 0 (50 -> 25 a copy), then 2 (30 > 25)
    [2, 1, 2, 1]
    >>> initial_layout(4, ep_size=2, num_redundant=2)  # rank 0: slots 0-2, rank 1: slots 3-5
    (0, 1, 2, 3, 0, 1)
    >>> rank_loads([50, 10, 30, 10], (0, 1, 2, 3, 0, 1), 2)
    [60.0, 40.0]
    >>> plan = rebalance([[50, 10, 30, 10]], ep_size=2, num_redundant=2)
    >>> plan.slot_expert_LP  # packed {0, 2, 1} and {0, 2, 3}; only slot 5 changes (1 -> 2)
    ((0, 1, 2, 3, 0, 2),)
    >>> rank_loads([50, 10, 30, 10], plan.slot_expert_LP[0], 2)
    [50.0, 50.0]
    >>> plan.before_L, plan.after_L  # max/mean rank load
    ((1.2,), (1.0,))
    >>> transfers([(0, 1, 2, 3, 0, 1)], plan.slot_expert_LP, slots_per_rank=3)  # slot 5 reads rank 0's copy
    [Transfer(layer=0, src=2, dst=5)]

The initial layout puts expert p mod E at physical slot p: every rank loads as many experts from
the checkpoint, and no two copies of an expert share a rank while there are at most E slots a rank.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import isfinite


def check_shape(num_experts: int, ep_size: int, num_redundant: int) -> int:
    """Slots per rank, or a ValueError saying which numbers to choose. Every rank holds the same
    number of slots, so E + redundant must divide over the ranks; more than E * (ep_size - 1)
    redundant copies would put two copies of an expert on one rank, which balances nothing."""
    for name, value in (("num_experts", num_experts), ("ep_size", ep_size), ("num_redundant_experts", num_redundant)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_experts < 1 or ep_size < 1 or num_redundant < 0:
        raise ValueError(f"need num_experts >= 1, ep_size >= 1, num_redundant_experts >= 0; got {num_experts}, "
                         f"{ep_size}, {num_redundant}")
    most = num_experts * (ep_size - 1)
    if num_redundant > most:
        raise ValueError(f"num_redundant_experts {num_redundant} is more than {num_experts} experts over {ep_size} "
                         f"ranks can use (at most {most}: one copy of every expert on every rank)")
    slots = num_experts + num_redundant
    if slots % ep_size or slots < ep_size:
        fits = [r for r in range(0, min(most, num_redundant + ep_size) + 1) if (num_experts + r) % ep_size == 0]
        raise ValueError(f"{num_experts} experts + {num_redundant} redundant = {slots} slots do not divide evenly "
                         f"over {ep_size} ranks; choose num_redundant_experts from {fits or 'none: change ep_size'}")
    return slots // ep_size


def initial_layout(num_experts: int, ep_size: int, num_redundant: int) -> tuple[int, ...]:
    """Expert of each physical slot before any rebalance: p mod E."""
    slots = check_shape(num_experts, ep_size, num_redundant) * ep_size
    return tuple(p % num_experts for p in range(slots))


def copies_of(load_E: Sequence[float], num_slots: int, max_copies: int | None = None) -> list[int]:
    """Copies of each expert over `num_slots` slots: one each, then each extra to the expert with
    the largest load per copy that has fewer than `max_copies` (the ranks: a second copy on one rank
    would share nothing out)."""
    copies = [1] * len(load_E)
    limit = max_copies or num_slots
    for _ in range(num_slots - len(load_E)):
        best = max((e for e in range(len(load_E)) if copies[e] < limit), key=lambda e: (load_E[e] / copies[e], -e))
        copies[best] += 1
    return copies


def rank_loads(load_E: Sequence[float], slot_expert_P: Sequence[int], ep_size: int) -> list[float]:
    """Tokens each rank serves under a layout, every expert's load split evenly over its copies."""
    copies = [0] * len(load_E)
    for e in slot_expert_P:
        copies[e] += 1
    per_rank = len(slot_expert_P) // ep_size
    return [sum(load_E[e] / copies[e] for e in slot_expert_P[r * per_rank:(r + 1) * per_rank])
            for r in range(ep_size)]


def imbalance(loads_R: Sequence[float]) -> float:
    """Max over mean rank load; 1.0 (even) when there is no load."""
    mean = sum(loads_R) / len(loads_R)
    return max(loads_R) / mean if mean > 0 else 1.0


def pack(load_E: Sequence[float], copies_E: Sequence[int], ep_size: int,
         current_P: Sequence[int] | None = None) -> tuple[int, ...]:
    """A layout (expert of each physical slot) of these copies: heaviest copy first onto the
    least-loaded rank with a free slot that does not hold the expert yet (any rank with a free slot
    when none is left), then relabelled and ordered to keep `current_P`'s experts where they are."""
    num_slots = sum(copies_E)
    per_rank = num_slots // ep_size
    items = sorted(((load_E[e] / copies_E[e], e) for e in range(len(load_E)) for _ in range(copies_E[e])),
                   key=lambda item: (-item[0], item[1]))
    bins: list[list[int]] = [[] for _ in range(ep_size)]
    totals = [0.0] * ep_size
    for weight, e in items:
        open_ranks = [r for r in range(ep_size) if len(bins[r]) < per_rank]
        fresh = [r for r in open_ranks if e not in bins[r]] or open_ranks
        r = min(fresh, key=lambda r: (totals[r], r))
        bins[r].append(e)
        totals[r] += weight
    if current_P is None:
        return tuple(e for b in bins for e in b)
    current = [list(current_P[r * per_rank:(r + 1) * per_rank]) for r in range(ep_size)]
    # Relabel: each packed bin to the free current rank holding most of its experts (largest overlaps first).
    pairs = sorted((-_overlap(bins[b], current[r]), b, r) for b in range(ep_size) for r in range(ep_size))
    rank_of_bin: dict[int, int] = {}
    for _, b, r in pairs:
        if b not in rank_of_bin and r not in rank_of_bin.values():
            rank_of_bin[b] = r
    layout = [-1] * num_slots
    for b, r in rank_of_bin.items():
        layout[r * per_rank:(r + 1) * per_rank] = _keep_slots(bins[b], current[r])
    return tuple(layout)


def _overlap(experts: list[int], held: list[int]) -> int:
    left = list(held)
    count = 0
    for e in experts:
        if e in left:
            left.remove(e)
            count += 1
    return count


def _keep_slots(experts: list[int], held: list[int]) -> list[int]:
    """The rank's slots: an expert it holds already stays in its slot, the others fill the rest."""
    slots: list[int | None] = [None] * len(held)
    rest = []
    for e in experts:
        keep = next((s for s, h in enumerate(held) if h == e and slots[s] is None), None)
        if keep is None:
            rest.append(e)
        else:
            slots[keep] = e
    for s in range(len(slots)):
        if slots[s] is None:
            slots[s] = rest.pop(0)
    return [e for e in slots if e is not None]


@dataclass(frozen=True)
class Rebalance:
    slot_expert_LP: tuple[tuple[int, ...], ...]
    """Per MoE layer, the logical expert at each physical slot (rank p // S, local slot p % S)."""
    before_L: tuple[float, ...]
    """Per layer, the max/mean rank load of the current layout under the given load."""
    after_L: tuple[float, ...]
    """Per layer, the same for the new layout (predicted: the same load, split over the new copies)."""


def check_load(load_LE: Sequence[Sequence[float]], num_experts: int | None = None) -> list[list[float]]:
    """The load as floats, or a ValueError: a non-empty [L, E] table of finite, non-negative numbers."""
    try:
        rows = [[float(x) for x in row] for row in load_LE]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the expert load must be a table of numbers per layer and expert: {exc}") from None
    if not rows or any(len(row) != len(rows[0]) for row in rows) or not rows[0]:
        raise ValueError("the expert load must be a non-empty [layers, experts] table with as many experts per layer")
    if num_experts is not None and len(rows[0]) != num_experts:
        raise ValueError(f"the expert load has {len(rows[0])} experts per layer, the model {num_experts}")
    if any(not isfinite(x) or x < 0 for row in rows for x in row):
        raise ValueError("the expert load must be finite and non-negative")
    return rows


def rebalance(load_LE: Sequence[Sequence[float]], ep_size: int, num_redundant: int,
              current_LP: Sequence[Sequence[int]] | None = None) -> Rebalance:
    """The layout of every layer for its load [L, E] (token counts), and the max/mean rank load
    before and after. `current_LP`: the layout in force (default: `initial_layout`); a layer keeps
    it where the greedy layout would not lower that ratio."""
    rows = check_load(load_LE)
    E = len(rows[0])
    initial = initial_layout(E, ep_size, num_redundant)
    current = [tuple(c) for c in current_LP] if current_LP is not None else [initial] * len(rows)
    if len(current) != len(rows) or any(sorted(set(c)) != list(range(E)) or len(c) != len(initial)
                                        for c in current):
        raise ValueError(f"the current layout must give each of {len(rows)} layers {len(initial)} slots holding "
                         f"every one of the {E} experts")
    layouts, before, after = [], [], []
    for load_E, cur in zip(rows, current):
        layout = pack(load_E, copies_of(load_E, len(initial), ep_size), ep_size, cur)
        was, will = imbalance(rank_loads(load_E, cur, ep_size)), imbalance(rank_loads(load_E, layout, ep_size))
        if will >= was:
            layout, will = cur, was
        layouts.append(layout)
        before.append(was)
        after.append(will)
    return Rebalance(tuple(layouts), tuple(before), tuple(after))


@dataclass(frozen=True)
class Transfer:
    """One slot's new expert: copied from physical slot `src` (its current holder) into `dst`."""
    layer: int
    src: int
    dst: int


def transfers(old_LP: Sequence[Sequence[int]], new_LP: Sequence[Sequence[int]], slots_per_rank: int) -> list[Transfer]:
    """Every slot whose expert changes, in one order every rank computes alike, with its source: a
    slot of the same rank that holds the expert now (no communication), else the holders on other
    ranks in turn (so one hot expert's new copies are not all read from one rank)."""
    out = []
    for layer, (old, new) in enumerate(zip(old_LP, new_LP)):
        turn: dict[int, int] = {}
        for dst, (was, e) in enumerate(zip(old, new)):
            if was == e:
                continue
            rank = dst // slots_per_rank
            local = [p for p in range(rank * slots_per_rank, (rank + 1) * slots_per_rank) if old[p] == e]
            if local:
                out.append(Transfer(layer, local[0], dst))
                continue
            holders = [p for p, h in enumerate(old) if h == e]
            if not holders:
                raise ValueError(f"layer {layer}: expert {e} has no copy to read from")
            out.append(Transfer(layer, holders[turn.get(e, 0) % len(holders)], dst))
            turn[e] = turn.get(e, 0) + 1
    return out


def replica_tables(slot_expert_P: Sequence[int], num_experts: int,
                   max_copies: int) -> tuple[list[list[int]], list[int]]:
    """The dispatcher's tables of one layer: per expert, the physical slots of its copies (padded to
    `max_copies` by repeating the first) and how many there are."""
    slots_E: list[list[int]] = [[] for _ in range(num_experts)]
    for p, e in enumerate(slot_expert_P):
        slots_E[e].append(p)
    if any(not s or len(s) > max_copies for s in slots_E):
        raise ValueError(f"every expert needs 1 to {max_copies} copies, got {[len(s) for s in slots_E]}")
    return [s + [s[0]] * (max_copies - len(s)) for s in slots_E], [len(s) for s in slots_E]
