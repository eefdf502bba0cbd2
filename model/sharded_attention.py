"""The engine's sequence-parallel attention: the rows of sharded sequences in a step's layers.

A sequence at least `sequence_parallel_min_tokens` long is *sharded*: its KV cache is spread
over every rank of the EP group (`zigzag_owner` in units of one KV block; each rank's share in
its own paged blocks, key i of the shard in slot i of its shard block table), and its rows are
computed where they are cheapest to balance:

    a prompt row at position p          on the rank that owns p (each rank ~1/R of every chunk,
                                        so the MoE layers and attention see even shares)
    the row that samples (the last      on the sequence's *home* rank, which holds its sampling
    prompt row, every decode row)       state (seeded generator, penalties' counts, masks)

Where a row is computed and where its k/v live may differ (a decode row, the sampling row), so
k and v travel with q in the step's all-gather and the owner writes them into its shard:

    1. gather_rows: every rank's sharded rows, q k v together           [T_all, H + 2G, d]
    2. each rank writes the gathered rows it owns into its shard's slots,
       then attends every gathered row of each sequence to its shard    [T_all, H, d] + LSE
    3. return_partials: back to the rows' ranks, merged by log-sum-exp   [T, H, d]

In a step's flat batch a rank puts its ordinary rows first and its sharded rows after them
(`ShardedAttention.num_regular` splits them); every layer reads the same host-planned metadata
(`ShardedAttention.build`, once a step, identical arithmetic on every rank from the step plan).
The plain-torch path reads each shard's keys by slot (`partial_attention`, the oracle); the
kernel path reads them where they lie through the shard's block table (`paged_partial_attention`).
One rank (R = 1) runs the same code with no collective.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from expertmesh.model.sequence_parallel import (
    ShardPlan,
    gather_rows,
    paged_partial_attention,
    partial_attention,
    plan_shard_attention,
    return_partials,
    shard_index,
    shard_positions,
    shard_sizes,
)


def row_ranks(start: int, num_tokens: int, sample: bool, home: int, world: int, unit: int) -> np.ndarray:
    """The rank computing each position start .. start + num_tokens - 1 of a sharded sequence's
    step: its owner, but the home rank for the row that samples (the last, when `sample`)."""
    owner, _ = shard_index(np.arange(start, start + num_tokens, dtype=np.int64), world, unit)
    if sample and num_tokens:
        owner[-1] = home
    return owner


def row_counts(start: int, num_tokens: int, sample: bool, home: int, world: int, unit: int) -> np.ndarray:
    """int64 [R]: rows of each rank for that step (closed form, no per-position work: the core
    sizes a 262,144-token prompt's chunks with it)."""
    counts = shard_sizes(start + num_tokens, world, unit) - shard_sizes(start, world, unit)
    if sample and num_tokens:
        owner, _ = shard_index(np.array([start + num_tokens - 1]), world, unit)
        counts[owner[0]] -= 1
        counts[home] += 1
    return counts


@dataclass(frozen=True)
class ShardedChunk:
    """A sharded sequence's step as every rank sees it in the plan."""

    request_id: str
    home: int
    """The rank that holds the sequence's sampling state and computes its sampling row."""
    start: int
    """Position of the first token computed this step."""
    token_ids: np.ndarray
    """int64 [n]: the tokens at positions start .. start + n - 1 (the plan carries them: the
    ranks other than home keep no state of the sequence)."""
    sample: bool
    """The step reaches the last known token: home samples the next one."""
    block_ids_by_rank: tuple[np.ndarray, ...]
    """Each rank's shard block table (int64), covering its keys up to the step's end."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    def positions(self, rank: int, world: int, unit: int) -> np.ndarray:
        """The positions `rank` computes this step, ascending."""
        ranks = row_ranks(self.start, self.num_tokens, self.sample, self.home, world, unit)
        return self.start + np.flatnonzero(ranks == rank)


@dataclass(frozen=True)
class ShardedSeq:
    """One sharded sequence's part of step 2 on this rank."""

    rows_R: torch.Tensor
    """int64: its rows among the gathered rows (rank after rank)."""
    q_pos_R: torch.Tensor
    """int64: their positions."""
    k_pos_L: torch.Tensor | None = None
    """int64: the positions of the keys this rank holds, this step's included (the plain-torch path)."""
    slots_L: torch.Tensor | None = None
    """int64: the cache slots of those keys (the plain-torch path reads them there)."""
    blocks_M: torch.Tensor | None = None
    """int32: the shard's block table (the kernel path)."""
    plan: ShardPlan | None = None
    """The paged kernel's plan of these rows over the shard (the kernel path)."""


@dataclass(frozen=True)
class ShardedAttention:
    """A step's sharded rows, as every layer of this rank attends them."""

    num_regular: int
    """Rows of the flat batch before the sharded ones (ordinary sequences)."""
    rows_per_rank: tuple[int, ...]
    """Sharded rows of every rank this step."""
    rank: int
    positions_T: torch.Tensor
    """int64 [rows_per_rank[rank]]: positions of this rank's sharded rows (their rope)."""
    write_rows: torch.Tensor
    """int64: the gathered rows whose k/v this rank holds..."""
    write_slots: torch.Tensor
    """int64: ...and the cache slots they go to."""
    seqs: tuple[ShardedSeq, ...]
    group: dist.ProcessGroup | None = None
    """The EP group's process group (None: the default one, or no collective on one rank)."""

    @property
    def world(self) -> int:
        return len(self.rows_per_rank)

    @classmethod
    def build(cls, chunks: Sequence[ShardedChunk], *, rank: int, world: int, block_size: int, num_regular: int,
              device: torch.device, kernel_heads: tuple[int, int] | None = None,
              group: dist.ProcessGroup | None = None) -> ShardedAttention:
        """From the plan's sharded chunks (the same on every rank). `kernel_heads` (H, G): plan the
        paged kernel's step 2 too (the kernel path)."""
        unit = block_size
        rows = [[c.positions(r, world, unit) for c in chunks] for r in range(world)]  # [rank][chunk]
        rows_per_rank = tuple(sum(len(p) for p in per_chunk) for per_chunk in rows)
        offsets = np.concatenate(([0], np.cumsum(rows_per_rank)))
        write_rows, write_slots, seqs = [], [], []
        for i, chunk in enumerate(chunks):
            gathered, q_pos = [], []
            for r in range(world):
                before = sum(len(p) for p in rows[r][:i])
                gathered.append(offsets[r] + before + np.arange(len(rows[r][i])))
                q_pos.append(rows[r][i])
            gathered_R, q_pos_R = np.concatenate(gathered), np.concatenate(q_pos)
            table = np.asarray(chunk.block_ids_by_rank[rank], dtype=np.int64)
            owner, index = shard_index(q_pos_R, world, unit)
            mine = owner == rank
            if (index[mine] >= len(table) * block_size).any():
                raise ValueError(f"sharded sequence {chunk.request_id!r}: rank {rank}'s shard block table "
                                 f"({len(table)} blocks) does not hold its keys up to position {chunk.end}")
            write_rows.append(gathered_R[mine])
            write_slots.append(table[index[mine] // block_size] * block_size + index[mine] % block_size)
            k_pos = shard_positions(chunk.end, world, unit, rank)
            rows_R, q_pos_dev = _dev(gathered_R, device), _dev(q_pos_R, device)
            if kernel_heads is not None:  # the kernel reads the shard through its table: no per-key copy
                plan = plan_shard_attention(q_pos_R, k_pos, num_q_heads=kernel_heads[0],
                                            num_kv_heads=kernel_heads[1], device=device)
                seqs.append(ShardedSeq(rows_R, q_pos_dev, blocks_M=torch.from_numpy(table.astype(np.int32)).to(device),
                                       plan=plan))
            else:
                key_index = np.arange(len(k_pos))
                slots = table[key_index // block_size] * block_size + key_index % block_size
                seqs.append(ShardedSeq(rows_R, q_pos_dev, _dev(k_pos, device), _dev(slots, device)))
        mine = np.concatenate([p for p in rows[rank]]) if chunks else np.zeros(0, dtype=np.int64)
        return cls(num_regular, rows_per_rank, rank, _dev(mine, device), _dev(_cat(write_rows), device),
                   _dev(_cat(write_slots), device), tuple(seqs), group)


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, dtype=np.int64)


def _dev(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)


def sharded_attention(q_THd: torch.Tensor, k_TGd: torch.Tensor, v_TGd: torch.Tensor, kv_2NSGd: torch.Tensor,
                      sp: ShardedAttention, scale: float, kernel: bool = False) -> torch.Tensor:
    """This rank's sharded rows (q, and k/v already normalised and rotated) attended over their
    whole sequences: steps 1-3 of the module docstring. Returns [T, H*d] in q's dtype."""
    T, H, d = q_THd.shape
    G = k_TGd.shape[1]
    if sp.rows_per_rank[sp.rank] != T:
        raise ValueError(f"{T} sharded rows on rank {sp.rank}, the plan says {sp.rows_per_rank[sp.rank]}")
    if max(sp.rows_per_rank) == 0:
        return q_THd.new_zeros(0, H * d)
    qkv = torch.cat((q_THd, k_TGd.to(q_THd.dtype), v_TGd.to(q_THd.dtype)), dim=1)
    qkv_all = gather_rows(qkv, sp.rows_per_rank, sp.group, sp.world)
    slots = kv_2NSGd.view(2, -1, G, d)
    if len(sp.write_rows):
        kv_new = qkv_all.index_select(0, sp.write_rows)
        slots[0].index_copy_(0, sp.write_slots, kv_new[:, H:H + G].to(kv_2NSGd.dtype))
        slots[1].index_copy_(0, sp.write_slots, kv_new[:, H + G:].to(kv_2NSGd.dtype))
    n = qkv_all.shape[0]
    out = torch.zeros(n, H, d, dtype=torch.float32, device=q_THd.device)
    lse = torch.full((n, H), float("-inf"), dtype=torch.float32, device=q_THd.device)
    for seq in sp.seqs:
        q_sHd = qkv_all.index_select(0, seq.rows_R)[:, :H]
        if kernel:
            if seq.blocks_M is None or seq.plan is None:
                raise ValueError("the kernel path needs the shard's block table and plan (build with kernel_heads)")
            o, s = paged_partial_attention(q_sHd.to(kv_2NSGd.dtype).contiguous(), kv_2NSGd, seq.blocks_M, seq.plan,
                                           scale)
        else:
            if seq.slots_L is None or seq.k_pos_L is None:
                raise ValueError("the plain-torch path needs the shard's key slots (build without kernel_heads)")
            o, s = partial_attention(q_sHd, seq.q_pos_R, slots[0].index_select(0, seq.slots_L),
                                     slots[1].index_select(0, seq.slots_L), seq.k_pos_L, scale)
        out.index_copy_(0, seq.rows_R, o)
        lse.index_copy_(0, seq.rows_R, s)
    merged = return_partials(out, lse, sp.rows_per_rank, sp.rank, sp.group, sp.world)
    return merged.to(q_THd.dtype).view(T, H * d)


__all__ = ["ShardedAttention", "ShardedChunk", "ShardedSeq", "row_counts", "row_ranks", "sharded_attention"]
