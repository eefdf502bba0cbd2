"""Sequence-parallel attention: one long sequence's KV cache spread over the ranks of a group.

Legend: R ranks, T query rows of the sequence this step on one rank (T_all over all ranks),
L keys in one rank's shard, H query heads, G KV heads, d head dim.

A sequence too long for one rank keeps its KV on every rank of its group, each rank the keys of
the positions it owns (`zigzag_owner`: the positions go round the ranks in units, there and
back, so every rank holds about 1/R of the keys and, under the causal mask, about 1/R of the
work at any length). Its query rows are spread the same way: each rank computes q, k and v of
the positions it owns (so the MoE layers see an even share of the prompt) and writes k and v into
its own cache. Attention then moves queries, not keys:

    1. all-gather the step's q rows (and their positions) of every rank          [T_all, H, d]
    2. every rank attends all of them to its own shard, causally by position:
       a partial output and its log-sum-exp per (row, head)                      [T_all, H, d+1]
    3. all-to-all the partials back to the rows' owners; each merges its R
       partials by log-sum-exp into the exact softmax over the whole sequence    [T, H, d]

Keys stay where they were written, at every length, in prefill chunks and in decode alike (vLLM's
context-parallel decode does the same): a step moves the step's queries and their outputs, never
the cache. With 4 KV heads to 64 query heads (Qwen3-235B), moving a chunk's q costs 8x moving its
k/v, but the earlier chunks' keys would have to move as well, and at 262,144 tokens those are
~512 MiB a layer against ~100 MiB for a 2,048-token chunk's queries and partial outputs.

`partial_attention` and `merge_partials` are the plain-torch math (the CPU path and the oracle of
any kernel that replaces step 2); `paged_partial_attention` is step 2 on the GPU: the paged kernel
(model/triton_attention.py) reading the shard where it lies in the rank's KV cache, its LSE beside
the output. The shard's keys sit in its blocks in position order, so the keys a row sees are a
prefix of them (`shard_runs`): the rows become sequences of the kernel's plan, a run of rows this
rank owns attending causally, a run it does not own seeing a fixed prefix (a key limit), planned
once a step on the host (`plan_shard_attention`: one non-blocking copy) for every layer. The
collective is handed in (`group`, a torch.distributed process group: gloo on the CPU, NCCL on
GPUs), never looked up.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from expertmesh.model.paged_attention import SPLIT_GRANULE, AttentionPlanTensors, attention_sms, plan_attention

QUERY_BLOCK = 1024
"""Query rows attended at once in `partial_attention` (bounds the [H, rows, L] score matrix)."""


def zigzag_owner(positions: torch.Tensor, world: int, unit: int) -> torch.Tensor:
    """Rank owning each position: units of `unit` positions dealt 0, 1, ..., R-1, R-1, ..., 1, 0,
    0, 1, ...: every rank's share of any prefix is within two units of 1/R, and so is its share of
    causal work (a late unit, costly to attend from, pairs with an early one)."""
    if world < 1 or unit < 1:
        raise ValueError(f"world ({world}) and unit ({unit}) must be at least 1")
    turn = torch.div(positions, unit, rounding_mode="floor") % (2 * world)
    return torch.where(turn < world, turn, 2 * world - 1 - turn)


def shard_sizes(num_tokens: int, world: int, unit: int) -> np.ndarray:
    """int64 [R]: how many of positions 0 .. num_tokens - 1 each rank holds under `zigzag_owner`
    (closed form: every period of 2R units gives each rank two; each within one unit of 1/R)."""
    if world < 1 or unit < 1 or num_tokens < 0:
        raise ValueError(f"world ({world}) and unit ({unit}) must be at least 1, num_tokens ({num_tokens}) >= 0")
    full, rem = divmod(num_tokens, 2 * world * unit)
    r = np.arange(world, dtype=np.int64)
    return (full * 2 * unit + np.clip(rem - r * unit, 0, unit)
            + np.clip(rem - (2 * world - 1 - r) * unit, 0, unit))


def shard_index(positions: np.ndarray, world: int, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """(owner rank, index in the owner's shard) of each position: a shard holds its positions in
    ascending order, key i in slot i of its blocks."""
    period, turn = np.divmod(np.asarray(positions, dtype=np.int64) // unit, 2 * world)
    second = turn >= world  # the owner's second unit of the period
    owner = np.where(second, 2 * world - 1 - turn, turn)
    index = period * 2 * unit + second * unit + np.asarray(positions, dtype=np.int64) % unit
    return owner, index


def shard_positions(num_tokens: int, world: int, unit: int, rank: int) -> np.ndarray:
    """int64, ascending: the positions below num_tokens that `rank` holds (key i of its shard is
    at position shard_positions(...)[i]); the inverse of `shard_index`."""
    i = np.arange(shard_sizes(num_tokens, world, unit)[rank], dtype=np.int64)
    period, within = np.divmod(i, 2 * unit)
    second = within >= unit
    return period * 2 * world * unit + np.where(second, 2 * world - 1 - rank, rank) * unit + within % unit


def partial_attention(q_THd: torch.Tensor, q_pos_T: torch.Tensor, k_LGd: torch.Tensor, v_LGd: torch.Tensor,
                      k_pos_L: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q rows over one shard of keys, each key visible to queries at or after
    its position: (output [T, H, d] float32, natural-log LSE [T, H] float32). A row that sees no
    key of the shard gets output 0 and LSE -inf (it adds nothing to the merge)."""
    T, H, d = q_THd.shape
    G = k_LGd.shape[1]
    if H % G or v_LGd.shape != k_LGd.shape or k_pos_L.shape != (k_LGd.shape[0],) or q_pos_T.shape != (T,):
        raise ValueError(f"q {tuple(q_THd.shape)}, k {tuple(k_LGd.shape)}, v {tuple(v_LGd.shape)}, "
                         f"positions {tuple(q_pos_T.shape)} and {tuple(k_pos_L.shape)} do not fit together")
    out = torch.zeros(T, H, d, dtype=torch.float32, device=q_THd.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q_THd.device)
    if T == 0 or k_LGd.shape[0] == 0:
        return out, lse
    k_GLd = k_LGd.float().transpose(0, 1)
    v_GLd = v_LGd.float().transpose(0, 1)
    for lo in range(0, T, QUERY_BLOCK):
        hi = min(T, lo + QUERY_BLOCK)
        q_GQtd = q_THd[lo:hi].float().view(hi - lo, G, H // G, d).permute(1, 2, 0, 3)  # [G, H/G, rows, d]
        scores = torch.einsum("gqtd,gld->gqtl", q_GQtd, k_GLd) * scale
        visible = k_pos_L[None, :] <= q_pos_T[lo:hi, None]  # [rows, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [G, H/G, rows]
        seen = torch.isfinite(row_lse)
        probs = torch.exp(scores - torch.where(seen, row_lse, 0.0)[..., None])
        o = torch.einsum("gqtl,gld->gqtd", probs, v_GLd)
        out[lo:hi] = o.permute(2, 0, 1, 3).reshape(hi - lo, H, d)
        lse[lo:hi] = row_lse.permute(2, 0, 1).reshape(hi - lo, H)
    return out, lse


def merge_partials(out_RTHd: torch.Tensor, lse_RTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R partial attentions of the same rows over disjoint key sets -> the attention over their
    union and its LSE (float32): each partial weighted by exp(its LSE - the merged LSE)."""
    merged = torch.logsumexp(lse_RTH, dim=0)  # [T, H]
    safe = torch.where(torch.isfinite(merged), merged, 0.0)
    weights = torch.exp(lse_RTH - safe[None])  # exp(-inf) = 0 for partials that saw nothing
    return (out_RTHd * weights[..., None]).sum(dim=0), merged


def shard_runs(q_pos_T: np.ndarray, shard_pos_L: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows at positions q_pos_T, against a shard whose i-th key sits at shard_pos_L[i] (strictly
    ascending): the rows as sequences of the paged kernel's plan over the shard's keys,
    (query_start_B1, seq_lens_B, key_limit_B). A run is a stretch of consecutive positions all in
    the shard or all outside it: in the shard, its rows attend causally to the keys up to their own
    (seq_len: the shard's keys up to the run's last row); outside it, every row sees the same
    prefix of the shard (the keys before the run; seq_len counts the run's rows past it, the limit
    stops the keys there). Rows may come in any order (each run is a stretch of them)."""
    q_pos = np.asarray(q_pos_T)
    shard = np.asarray(shard_pos_L)
    if q_pos.ndim != 1 or shard.ndim != 1 or not (np.issubdtype(q_pos.dtype, np.integer) or q_pos.size == 0) \
            or not (np.issubdtype(shard.dtype, np.integer) or shard.size == 0):
        raise ValueError("row and shard positions must be 1-D integer arrays")
    q_pos, shard = q_pos.astype(np.int64), shard.astype(np.int64)
    if (np.diff(shard) <= 0).any() or (shard.size and shard[0] < 0) or (q_pos < 0).any():
        raise ValueError("shard positions must rise strictly from 0 or more, and row positions be >= 0")
    n = len(q_pos)
    if n == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    seen = np.searchsorted(shard, q_pos, side="right")  # the shard's keys at or before each row
    own = seen > np.searchsorted(shard, q_pos, side="left")
    starts = np.flatnonzero(np.concatenate(([True], (q_pos[1:] != q_pos[:-1] + 1) | (own[1:] != own[:-1]))))
    query_start = np.append(starts, n)
    q_len = np.diff(query_start)
    last = query_start[1:] - 1
    seq_lens = np.where(own[starts], seen[last], seen[starts] + q_len)
    return query_start, seq_lens, seen[last]


@dataclass(frozen=True)
class ShardPlan:
    """One step's rows over this rank's shard, planned for the paged kernel once a step (every
    layer reads it): the kernel's plan and its sequences' lengths and query offsets on the device
    (None when no row or no key: every row then gets output 0 and LSE -inf)."""

    num_rows: int
    num_keys: int
    plan: AttentionPlanTensors | None = None
    seq_lens_B: torch.Tensor | None = None
    query_start_B1: torch.Tensor | None = None


def plan_shard_attention(q_pos_T: np.ndarray, shard_pos_L: np.ndarray, *, num_q_heads: int, num_kv_heads: int,
                         device: torch.device | str, num_sms: int | None = None, min_split_keys: int = SPLIT_GRANULE,
                         split_granule: int = SPLIT_GRANULE) -> ShardPlan:
    """Plan every rank's rows this step (host positions, as the step plan gives them) over this
    rank's shard (host positions of its keys, ascending): `shard_runs`, the kernel's plan with
    their key limits, and one copy to the device (from pinned memory, not waited for). Split
    arguments as `plan_attention`'s (a decode row over a long shard splits across the SMs)."""
    device = torch.device(device)
    query_start, seq_lens, key_limit = shard_runs(q_pos_T, shard_pos_L)
    num_rows, num_keys = int(query_start[-1]), len(np.asarray(shard_pos_L))
    if num_rows == 0 or num_keys == 0:
        return ShardPlan(num_rows, num_keys)
    plan = plan_attention(query_start, seq_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                          num_sms=attention_sms(device) if num_sms is None else num_sms,
                          key_limit_B=key_limit, min_split_keys=min_split_keys, split_granule=split_granule)
    flat = np.concatenate((plan.packed(), seq_lens.astype(np.int32), query_start.astype(np.int32)))
    host = torch.from_numpy(flat)
    if device.type == "cuda":
        host = host.pin_memory()
    buffer = host.to(device, non_blocking=True)
    n_plan, B = plan.packed_size, len(seq_lens)
    return ShardPlan(num_rows, num_keys, AttentionPlanTensors.view(plan, buffer[:n_plan]),
                     buffer[n_plan: n_plan + B], buffer[n_plan + B:])


def paged_partial_attention(q_THd: torch.Tensor, kv_2NSGd: torch.Tensor, shard_blocks_M: torch.Tensor,
                            shard: ShardPlan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`partial_attention` through the paged kernel: q rows [T, H, d] (the cache's dtype) over the
    shard held in kv_2NSGd's blocks shard_blocks_M (int32 [M] on the device, the shard's block
    table: its i-th key in slot i), planned by `plan_shard_attention` for these rows. Returns
    (output [T, H, d] float32, natural-log LSE [T, H]); a row that sees none of the shard gets 0
    and -inf. The kernel writes the output in q's dtype (as everywhere else), the LSE in float32."""
    from expertmesh.model.triton_attention import paged_attention

    T, H, d = q_THd.shape
    if shard.num_rows != T:
        raise ValueError(f"the shard plan is for {shard.num_rows} rows, q has {T}")
    if shard_blocks_M.ndim != 1 or shard_blocks_M.numel() * kv_2NSGd.shape[2] < shard.num_keys:
        raise ValueError(f"the shard's block table ({tuple(shard_blocks_M.shape)}, blocks of {kv_2NSGd.shape[2]}) "
                         f"does not hold its {shard.num_keys} keys")
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q_THd.device)
    if shard.plan is None or shard.seq_lens_B is None or shard.query_start_B1 is None:
        return torch.zeros(T, H, d, dtype=torch.float32, device=q_THd.device), lse
    table = shard_blocks_M.to(dtype=torch.int32)[None].expand(len(shard.seq_lens_B), -1)
    part, _ = paged_attention(q_THd, kv_2NSGd, table, shard.seq_lens_B, shard.query_start_B1, shard.plan,
                              scale=scale, lse=lse)
    return part.float(), lse


def gather_rows(x_TXd: torch.Tensor, rows_per_rank: Sequence[int], group: dist.ProcessGroup | None = None,
                world: int | None = None) -> torch.Tensor:
    """Step 1: every rank's rows [T_r, X, d], rank after rank [T_all, X, d] (padded to the widest
    rank on the wire: all_gather takes equal sizes). A one-rank group returns x itself, with no
    collective (`world` 1; None reads the group's size)."""
    R = dist.get_world_size(group) if world is None else world
    if R == 1:
        return x_TXd
    width = max(rows_per_rank)
    padded = x_TXd.new_zeros(width, *x_TXd.shape[1:])
    padded[: x_TXd.shape[0]] = x_TXd
    gathered = [torch.empty_like(padded) for _ in range(R)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, rows_per_rank)])


def return_partials(out_all: torch.Tensor, lse_all: torch.Tensor, rows_per_rank: Sequence[int], me: int,
                    group: dist.ProcessGroup | None = None, world: int | None = None) -> torch.Tensor:
    """Step 3: this rank's partials of every rank's rows (out [T_all, H, d] float32, LSE [T_all, H],
    rank after rank) go back to the rows' owners, output and LSE in one all-to-all; each rank
    merges the R partials of its own rows by log-sum-exp: [T_me, H, d] float32."""
    R = dist.get_world_size(group) if world is None else world
    T, (_, H, d) = rows_per_rank[me], out_all.shape
    send = torch.cat((out_all, lse_all[..., None]), dim=-1).contiguous()  # [T_all, H, d + 1], rank by rank
    if R == 1:
        recv = send
    else:
        recv = send.new_empty(R * T, H, d + 1)
        dist.all_to_all_single(recv, send, output_split_sizes=[T] * R, input_split_sizes=list(rows_per_rank),
                               group=group)
    parts = recv.view(R, T, H, d + 1)
    return merge_partials(parts[..., :d], parts[..., d])[0]


def sequence_parallel_attention(q_THd: torch.Tensor, q_pos_T: torch.Tensor, k_LGd: torch.Tensor | None,
                                v_LGd: torch.Tensor | None, k_pos_L: torch.Tensor | None, *,
                                rows_per_rank: Sequence[int], scale: float, group: dist.ProcessGroup | None = None,
                                attend: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                                | None = None) -> torch.Tensor:
    """This rank's q rows [T, H, d] attended over the whole sequence, whose keys are spread over
    the group (this rank's shard: k/v [L, G, d] at positions k_pos_L, this step's own keys already
    in it). `rows_per_rank`: every rank's T this step, known to all from the step plan (a rank
    with no rows still joins: the collectives need every rank). `attend`: step 2 in place of
    `partial_attention` over k/v (which may then be None), called with every rank's rows and their
    positions (gathered, on the device) and returning (output float32, LSE):
    `paged_partial_attention` over the rank's cache, with a `ShardPlan` made once a step from the
    same positions on the host. Output in q's dtype. (The engine's layers use `gather_rows` and
    `return_partials` directly: model/sharded_attention.py.)"""
    R, me = dist.get_world_size(group), dist.get_rank(group)
    T, H, d = q_THd.shape
    if len(rows_per_rank) != R or rows_per_rank[me] != T:
        raise ValueError(f"rows_per_rank {list(rows_per_rank)} does not say this rank's {T} rows of {R} ranks")
    if max(rows_per_rank) == 0:  # no rank has rows (every rank sees the same rows_per_rank, so all return here)
        return q_THd.new_zeros(0, H, d)
    # 1. every rank's rows and positions (positions travel exactly, int64, beside the rows)
    q_all = gather_rows(q_THd, rows_per_rank, group)
    pos_all = gather_rows(q_pos_T[:, None, None], rows_per_rank, group).view(-1)
    # 2. all rows over this rank's shard
    if attend is not None:
        out, lse = attend(q_all, pos_all)
    else:
        if k_LGd is None or v_LGd is None or k_pos_L is None:
            raise ValueError("without `attend`, the shard's k, v and positions are needed")
        out, lse = partial_attention(q_all, pos_all, k_LGd, v_LGd, k_pos_L, scale)
    # 3. each rank's rows back to it, output and LSE together, then merged
    return return_partials(out, lse, rows_per_rank, me, group).to(q_THd.dtype)


def causal_attention_reference(q_THd: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """Plain causal GQA attention of one whole sequence (float32 out): the one-rank oracle."""
    positions = torch.arange(q_THd.shape[0], device=q_THd.device)
    out, _ = partial_attention(q_THd, positions, k_THd, v_THd, positions,
                               q_THd.shape[-1] ** -0.5 if scale is None else scale)
    return out


__all__ = ["ShardPlan", "causal_attention_reference", "gather_rows", "merge_partials", "paged_partial_attention",
           "partial_attention", "plan_shard_attention", "return_partials", "sequence_parallel_attention",
           "shard_index", "shard_positions", "shard_runs", "shard_sizes", "zigzag_owner"]
