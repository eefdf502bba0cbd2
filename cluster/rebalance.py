"""Moving expert weights between the ranks of an EP group when the load balancer changes a layout.

Every rank calls `apply_layouts` with the same old and new layouts (one call from the executor,
between two steps); `router.eplb.transfers` lists, in one order every rank agrees on, each slot
whose expert changes and the slot it reads from. Per MoE layer:

  1. each slot a rank must fill gets a buffer: a clone of a local slot (same rank), or a receive
     from the rank that holds the expert now (point-to-point over the EP group's process group:
     gloo on the CPU, NCCL on GPUs), while that rank sends from its current weights;
  2. all of the layer's sends and receives run as one batch and are waited for;
  3. only then are the buffers written into the slots, in place (`copy_`): a send never reads a
     slot already overwritten, and parameters keep their storage, so captured CUDA graphs stay
     valid.

Every parameter of a layer's `Experts` moves, whatever it is: bf16/float32 weights, and FP8
weights with their block scales. Tensors travel as raw bytes (gloo has no float8).
The dispatcher's replica tables are then overwritten in place (`ReplicaTables.update`).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from expertmesh.router.eplb import Transfer


def move_experts(experts_by_layer: list[torch.nn.Module], plan: list[Transfer], rank: int,
                 slots_per_rank: int, group: dist.ProcessGroup | None = None) -> int:
    """Carry out `plan` for this rank; `experts_by_layer[l]` is MoE layer l's `Experts`, each
    parameter with one row per local slot. Returns how many of this rank's slots were written."""
    by_layer: dict[int, list[Transfer]] = defaultdict(list)
    for move in plan:
        by_layer[move.layer].append(move)
    written = 0
    for layer, moves in sorted(by_layer.items()):
        params = [p for _, p in sorted(experts_by_layer[layer].named_parameters())]
        ops, incoming = [], []
        for move in moves:
            src_rank, dst_rank = move.src // slots_per_rank, move.dst // slots_per_rank
            src_slot, dst_slot = move.src % slots_per_rank, move.dst % slots_per_rank
            if dst_rank == rank:
                if src_rank == rank:
                    buffers = [p[src_slot].clone() for p in params]
                else:
                    buffers = [torch.empty_like(p[dst_slot]) for p in params]
                    ops += [dist.P2POp(dist.irecv, _bytes(b), src_rank, group) for b in buffers]
                incoming.append((dst_slot, buffers))
            elif src_rank == rank:
                ops += [dist.P2POp(dist.isend, _bytes(p[src_slot]), dst_rank, group) for p in params]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        with torch.no_grad():
            for slot, buffers in incoming:
                for p, buffer in zip(params, buffers):
                    p[slot].copy_(buffer)
        written += len(incoming)
    return written


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as uint8 (a view: receiving into it fills the tensor)."""
    if not t.is_contiguous():  # a copy would receive the bytes instead of the slot
        raise ValueError("expert weights move slot by slot: each slot's tensor must be contiguous")
    return t.view(torch.uint8)
