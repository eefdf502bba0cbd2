"""Attention over a paged KV cache, for a flat batch of tokens from many sequences.

Legend: T tokens of the step (flat, no padding), B sequences, H query heads, G KV heads,
d head dim, N KV blocks, S block size, M blocks per sequence (block table width),
Q longest query chunk of the step, L = M*S key positions per sequence.

KV cache of one layer: `kv_2NSGd` = [2, N, S, G, d] (K then V), the layout paged decode kernels
read (vLLM's). A token at position p of a sequence lives in slot `block_table[p // S] * S + p % S`.

One step:
  1. q, k, v of the step's tokens (QK-norm and RoPE applied by the caller),
  2. k, v written into their slots (`slot_mapping_T`),
  3. each sequence's queries attend to its cached keys through its block table, causally.
The metadata is built once per step (`AttentionMetadata.build`) and shared by every layer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.config import ModelConfig
from expertmesh.model.layers import RMSNorm, RotaryEmbedding, apply_rope, fast_linear, fast_ops, rms_normalize
from expertmesh.model.sharded_attention import ShardedAttention, sharded_attention


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences attended together: in a step that mixes decodes (one query each) with prefill
    chunks, the decodes form one group and the prefills another, so no decode row is padded to
    a prefill chunk's length.

    token_index_T:   rows of the step's flat batch in this group (None: every row, in order).
    block_table_BM:  KV block ids of each sequence, padded with 0 (int64; padding is masked).
    q_pad_index_T:   where each of the group's tokens sits in the padded [B*Q] query layout.
    mask_B1QL:       True where a (query, key) pair may attend (causal, in-sequence, window).
    max_query_len:   Q.
    prefill_only:    no sequence of the group has cached keys: attention reads the step's own
                     k/v, padded like the queries, and the mask is [B, 1, Q, Q].
    uniform_causal:  prefill_only, every chunk has the same length and no sliding window: the
                     flat batch already is [B, Q] with no padding, and SDPA's own causal mask
                     applies (no padding copies, no explicit mask).
    """

    token_index_T: torch.Tensor | None
    block_table_BM: torch.Tensor
    q_pad_index_T: torch.Tensor
    mask_B1QL: torch.Tensor
    max_query_len: int
    prefill_only: bool
    uniform_causal: bool = False


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs, on the model's device.

    positions_T:     position of each token in its sequence (int64; int32 on the kernel path).
    slot_mapping_T:  KV slot each token's k/v is written to (int64; int32 on the kernel path,
                     where a negative slot writes nothing: the padding rows of a CUDA graph).
    query_start_B1:  offsets of each sequence's tokens in the flat batch (B+1 entries).
    groups:          the plain-torch path: one AttentionGroup, or two (decodes, prefills).
    kernel:          the CUDA kernel path instead (`PagedKernelInputs`): the cache is read where
                     it lies through the block table; built by the model runner's step inputs.
    sp:              sharded (sequence-parallel) sequences' rows, after the ordinary ones
                     (`ShardedAttention`); the fields above then cover the ordinary rows only.
    """

    positions_T: torch.Tensor
    slot_mapping_T: torch.Tensor
    query_start_B1: torch.Tensor
    groups: tuple[AttentionGroup, ...] = ()
    kernel: PagedKernelInputs | None = None
    sp: ShardedAttention | None = None

    @classmethod
    def build(
        cls,
        *,
        query_lens: list[int],
        starts: list[int],
        block_tables: list,
        block_size: int,
        device: torch.device,
        sliding_window: int | None = None,
    ) -> AttentionMetadata:
        """From plain per-sequence lists: tokens this step, first position, block ids. Index
        arithmetic runs in numpy on the host; masks are built on the device."""
        query_lens_B = np.asarray(query_lens, dtype=np.int64)
        starts_B = np.asarray(starts, dtype=np.int64)
        B = len(query_lens_B)
        query_start_B1 = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(query_lens_B, out=query_start_B1[1:])
        T = int(query_start_B1[-1])
        seq_of_T = np.repeat(np.arange(B), query_lens_B)
        positions_T = starts_B[seq_of_T] + (np.arange(T) - query_start_B1[:-1][seq_of_T])
        table_of = [np.asarray(t, dtype=np.int64) for t in block_tables]
        all_tables_BM = np.zeros((B, max(len(t) for t in table_of)), dtype=np.int64)
        for b, table in enumerate(table_of):
            all_tables_BM[b, : len(table)] = table
        slot_mapping_T = all_tables_BM[seq_of_T, positions_T // block_size] * block_size + positions_T % block_size
        decodes = np.flatnonzero(query_lens_B == 1)
        if 0 < len(decodes) < B:  # mixed step: decodes and prefill chunks attend separately
            prefills = np.flatnonzero(query_lens_B > 1)
            members = [decodes, prefills]
        else:
            members = [None]
        groups = tuple(
            _group(query_lens_B, starts_B, query_start_B1, table_of, seqs, block_size, sliding_window, device)
            for seqs in members)
        return cls(
            positions_T=_to(positions_T, device),
            slot_mapping_T=_to(slot_mapping_T, device),
            query_start_B1=_to(query_start_B1, device),
            groups=groups,
        )


    @classmethod
    def empty(cls, device: torch.device) -> AttentionMetadata:
        """No ordinary sequence this step (a rank that has only sharded rows, or none)."""
        none = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(positions_T=none, slot_mapping_T=none, query_start_B1=torch.zeros(1, dtype=torch.int64,
                                                                                     device=device))


@dataclass(frozen=True)
class PagedKernelInputs:
    """What the paged-attention kernel reads besides q and the cache (device tensors, int32).

    block_table_BM: each sequence's block ids (entries past its length are never read).
    seq_lens_B:     context length of each sequence after this step (its new tokens included).
    plan:           the kernel's work items on the device (`model.triton_attention.PlanTensors`).
    workspace:      preallocated partial outputs of split-KV work items.
    """

    block_table_BM: torch.Tensor
    seq_lens_B: torch.Tensor
    plan: object
    workspace: object


def _to(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def _group(query_lens_B, starts_B, query_start_B1, table_of, seqs, block_size, sliding_window, device):
    """An AttentionGroup over sequences `seqs` (None: all of them, in batch order)."""
    if seqs is None:
        seqs = np.arange(len(query_lens_B))
        token_index = None
    else:
        token_index = np.concatenate([np.arange(query_start_B1[b], query_start_B1[b + 1]) for b in seqs])
    q_lens, g_starts = query_lens_B[seqs], starts_B[seqs]
    B, Q = len(seqs), int(q_lens.max())
    M = max(len(table_of[b]) for b in seqs)
    block_table_BM = np.zeros((B, M), dtype=np.int64)
    for i, b in enumerate(seqs):
        block_table_BM[i, : len(table_of[b])] = table_of[b]
    local_start = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(q_lens, out=local_start[1:])
    seq_of_t = np.repeat(np.arange(B), q_lens)
    offset_t = np.arange(int(local_start[-1])) - local_start[:-1][seq_of_t]
    q_pad_index = seq_of_t * Q + offset_t
    # Query position per padded row; padding rows look at key 0 only, so softmax stays finite.
    q_pos_BQ = g_starts[:, None] + np.arange(Q)[None, :]
    q_pos_BQ = np.where(np.arange(Q)[None, :] < q_lens[:, None], q_pos_BQ, 0)
    prefill_only = not g_starts.any()
    uniform_causal = bool(prefill_only and sliding_window is None and token_index is None and (q_lens == Q).all())
    q_pos = _to(q_pos_BQ, device)
    key_pos_L = torch.arange(Q if prefill_only else M * block_size, device=device)
    mask_BQL = key_pos_L[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        mask_BQL &= key_pos_L[None, None, :] > q_pos[:, :, None] - sliding_window
    return AttentionGroup(
        token_index_T=None if token_index is None else _to(token_index, device),
        block_table_BM=_to(block_table_BM, device),
        q_pad_index_T=_to(q_pad_index, device),
        mask_B1QL=mask_BQL[:, None],
        max_query_len=Q,
        prefill_only=bool(prefill_only),
        uniform_causal=uniform_causal,
    )


def paged_attention(
    q_THd: torch.Tensor, k_TGd: torch.Tensor, v_TGd: torch.Tensor, kv_2NSGd: torch.Tensor,
    meta: AttentionMetadata, scale: float,
) -> torch.Tensor:
    """Attention of every token of the step, group by group (see AttentionGroup). Returns [T, H*d]."""
    if len(meta.groups) == 1:
        return _attend_group(q_THd, k_TGd, v_TGd, kv_2NSGd, meta.groups[0], scale)
    T, H, d = q_THd.shape
    out = q_THd.new_empty(T, H * d)
    for group in meta.groups:
        idx = group.token_index_T
        part = _attend_group(q_THd.index_select(0, idx), k_TGd.index_select(0, idx), v_TGd.index_select(0, idx),
                             kv_2NSGd, group, scale)
        out.index_copy_(0, idx, part)
    return out


def _attend_group(q_THd, k_TGd, v_TGd, kv_2NSGd, g: AttentionGroup, scale: float) -> torch.Tensor:
    """Reference paged attention with torch SDPA. Keys come from each sequence's blocks (K and V
    in one gather), or, when no sequence has cached context, straight from this step's k/v.
    Queries are padded to Q; a decode-only group (Q = 1) needs no padding."""
    _, H, d = q_THd.shape
    B, M = g.block_table_BM.shape
    _, _, S, G, _ = kv_2NSGd.shape
    Q = g.max_query_len

    def pad(x_TXd: torch.Tensor) -> torch.Tensor:  # [T, X, d] -> [B, X, Q, d]
        padded = x_TXd.new_zeros(B * Q, x_TXd.shape[1], d).index_copy_(0, g.q_pad_index_T, x_TXd)
        return padded.view(B, Q, -1, d).transpose(1, 2)

    if g.uniform_causal:  # [T, X, d] is [B, Q, X, d] already
        def seqs(x_TXd: torch.Tensor) -> torch.Tensor:
            return x_TXd.view(B, Q, x_TXd.shape[1], d).transpose(1, 2)

        out_BHQd = F.scaled_dot_product_attention(seqs(q_THd), seqs(k_TGd), seqs(v_TGd), is_causal=True,
                                                  scale=scale, enable_gqa=H != G)
        return out_BHQd.transpose(1, 2).reshape(B * Q, H * d)
    if g.prefill_only:
        k_BGLd, v_BGLd = pad(k_TGd), pad(v_TGd)
    else:
        # index_select on a flat view: several times faster than advanced indexing for this gather.
        blocks = kv_2NSGd.view(2, kv_2NSGd.shape[1], -1).index_select(1, g.block_table_BM.view(-1))
        kv_2BGLd = blocks.view(2, B, M * S, G, d).transpose(2, 3)
        k_BGLd, v_BGLd = kv_2BGLd[0], kv_2BGLd[1]
    q_BHQd = q_THd[:, :, None, :] if Q == 1 else pad(q_THd)
    out_BHQd = F.scaled_dot_product_attention(
        q_BHQd, k_BGLd, v_BGLd, attn_mask=g.mask_B1QL, scale=scale, enable_gqa=H != G
    )
    if Q == 1:
        return out_BHQd.reshape(B, H * d)
    return out_BHQd.transpose(1, 2).reshape(B * Q, H * d).index_select(0, g.q_pad_index_T)


class Attention(nn.Module):
    """GQA self-attention with optional QK-norm (Qwen3) and q/k/v bias (Qwen2), fused qkv GEMM.

    Two paths: the plain-torch one (CPU, and the oracle) with cos/sin handed in once per step;
    and with `fast` (CUDA) one Triton kernel for QK-norm, rope and the KV write, then the paged
    kernel reading the cache through the block table (`meta.kernel`); its qkv and o_proj GEMMs
    go through `fast_linear` (the small-batch GEMV at decode, cuBLAS otherwise)."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding | None = None, fast: bool = False) -> None:
        super().__init__()
        self.fast = fast
        self.sliding_window = config.sliding_window
        # Shared by every layer, and not a submodule: its buffer belongs to the model once.
        self._rotary = [rotary]
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.eps = config.rms_norm_eps
        self._qk_weight_cache: tuple[tuple, torch.Tensor] | None = None

    def _qk_norm_weight(self) -> torch.Tensor:
        """q_norm's weight for the H query heads and k_norm's for the G key heads, [H + G, d];
        rebuilt only when either weight changes (loading bumps the tensors' versions)."""
        q, k = self.q_norm.weight, self.k_norm.weight
        key = (q.data_ptr(), q._version, k.data_ptr(), k._version)
        if self._qk_weight_cache is None or self._qk_weight_cache[0] != key:
            weight = torch.cat((q.expand(self.num_heads, -1), k.expand(self.num_kv_heads, -1)))
            self._qk_weight_cache = (key, weight)
        return self._qk_weight_cache[1]

    def _qk_norm_weight_2d(self) -> torch.Tensor | None:
        """[2, d]: q_norm's weight, then k_norm's (the fused kernel's layout)."""
        if self.q_norm is None:
            return None
        q, k = self.q_norm.weight, self.k_norm.weight
        key = ("2d", q.data_ptr(), q._version, k.data_ptr(), k._version)
        if self._qk_weight_cache is None or self._qk_weight_cache[0] != key:
            self._qk_weight_cache = (key, torch.stack((q, k)))
        return self._qk_weight_cache[1]

    def forward(
        self,
        x_TD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
        kv_2NSGd: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x_TD.shape[0]
        H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv_T3d = (fast_linear(self.qkv_proj, x_TD) if self.fast else self.qkv_proj(x_TD)).view(T, H + 2 * G, d)
        sp = meta.sp
        if sp is None:
            return self.o_proj_out(self._attend(qkv_T3d, rope_cos_sin, kv_2NSGd, meta))
        # sharded sequences' rows come after the ordinary ones (model/sharded_attention.py)
        n = sp.num_regular
        parts = [self._attend(qkv_T3d[:n], rope_cos_sin, kv_2NSGd, meta)] if n else []
        q_THd, k_TGd, v_TGd = self._qk_norm_rope(qkv_T3d[n:], self._rotary[0](sp.positions_T, qkv_T3d.dtype))
        parts.append(sharded_attention(q_THd, k_TGd, v_TGd, kv_2NSGd, sp, self.scale, kernel=self.fast))
        return self.o_proj_out(torch.cat(parts) if len(parts) > 1 else parts[0])

    def o_proj_out(self, attn_TE: torch.Tensor) -> torch.Tensor:
        return fast_linear(self.o_proj, attn_TE) if self.fast else self.o_proj(attn_TE)

    def _qk_norm_rope(self, qkv_T3d: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor]):
        """q [T, H, d], k and v [T, G, d] of the plain-torch path: QK-norm and rope on q and k."""
        H, G = self.num_heads, self.num_kv_heads
        qk_THd, v_TGd = qkv_T3d[:, : H + G], qkv_T3d[:, H + G:]
        if self.q_norm is not None:
            qk_THd = self._qk_norm_weight() * rms_normalize(qk_THd, self.eps)
        qk_THd = apply_rope(qk_THd, *rope_cos_sin)
        return qk_THd[:, :H], qk_THd[:, H:], v_TGd

    def _attend(self, qkv_T3d: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
                kv_2NSGd: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Ordinary rows: k and v into their slots, each sequence's queries over its blocks, [T, H*d]."""
        H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
        # q and k heads sit side by side in the qkv output: normalise and rotate them together.
        if self.fast:
            rotary = self._rotary[0]
            q_THd = fast_ops().qk_norm_rope_kv(
                qkv_T3d, H, G, meta.positions_T, rotary.inv_freq, rotary.attention_factor, kv_2NSGd,
                meta.slot_mapping_T, self._qk_norm_weight_2d(), self.eps)
            return paged_attention_kernel(q_THd, kv_2NSGd, meta, self.scale, self.sliding_window)
        q_THd, k_TGd, v_TGd = self._qk_norm_rope(qkv_T3d, rope_cos_sin)
        k_TGd, v_TGd = k_TGd.to(kv_2NSGd.dtype), v_TGd.to(kv_2NSGd.dtype)
        slots = kv_2NSGd.view(2, -1, G, d)
        slots[0].index_copy_(0, meta.slot_mapping_T, k_TGd)
        slots[1].index_copy_(0, meta.slot_mapping_T, v_TGd)
        return paged_attention(q_THd, k_TGd, v_TGd, kv_2NSGd, meta, self.scale)


FINE_SPLIT_PIECES = 8
"""At most this many pieces per decode tile when a small batch splits finer than the default
granule: the merge folds a tile's pieces one after another, so each piece costs it a
round trip to L2 (a 200-token context: 4 pieces of 64; 1,000 tokens: 8 of 128; from ~2k the
default 256-key pieces are as fine)."""


def decode_split_args(query_start_B1: np.ndarray, seq_lens_B: np.ndarray, *, num_q_heads: int, num_kv_heads: int,
                      num_sms: int, block_n: int) -> dict[str, int]:
    """plan_attention's split arguments for a step: {} (the defaults: pieces of >= 256 keys on
    multiples of 256) except in a decode-only step whose tiles do not fill the SMs, where short
    contexts split on multiples of the decode kernel's BLOCK_N (`block_n`) into pieces of at
    least BLOCK_N keys and at most FINE_SPLIT_PIECES per tile. At batch 1 and 200 tokens the
    default leaves G programs of ~4 dependent key tiles each (latency-bound: 9.3 us a layer on an
    H200); 4 pieces of one tile each plus the merge take a fraction of that.

    The capacity bounds (`plan_bounds`) hold for any split arguments: pieces start on multiples
    of a chunk >= total keys / target, whatever the granule (test_plan_bounds_hold_every_random_step
    runs them with this function's arguments too)."""
    from expertmesh.model.paged_attention import SPLIT_GRANULE

    qpk = num_q_heads // num_kv_heads
    dec_bq = max(16, 1 << max(0, qpk - 1).bit_length()) // qpk  # decode tile queries, as plan_attention's
    starts, lens = np.asarray(query_start_B1).tolist(), np.asarray(seq_lens_B).tolist()  # ints beat numpy here
    q_len = [b - a for a, b in itertools.pairwise(starts)]
    decode = [n for q, n in zip(q_len, lens) if 1 <= q <= dec_bq]
    if not decode or any(q > dec_bq for q in q_len) or len(decode) * num_kv_heads >= num_sms:
        return {}
    longest = max(decode)
    per_piece = -(-longest // FINE_SPLIT_PIECES)
    piece = -(-per_piece // block_n) * block_n  # rounded up to whole key tiles
    if piece >= SPLIT_GRANULE or SPLIT_GRANULE % block_n:
        return {}
    return {"min_split_keys": max(block_n, piece), "split_granule": block_n}


class KernelAttentionPlanner:
    """The kernel path's per-step attention plan: work items planned on the host once per step
    (`model.paged_attention.plan_attention`), uploaded through buffers that never move, and
    handed to every layer (`kernel_inputs`). A CUDA graph's steps plan with `pad_to` = its batch
    size, so they lay out exactly as the captured plan did. Small decode batches split their
    keys finer (`decode_split_args`); the layout does not depend on it."""

    def __init__(self, config: ModelConfig, device: torch.device, *, max_seqs: int, max_tokens: int) -> None:
        from expertmesh.model.paged_attention import AttentionPlanBuffers, attention_config, attention_sms, plan_bounds
        from expertmesh.model.triton_attention import AttentionWorkspace

        self.num_q_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.sliding_window = config.sliding_window
        self.num_sms = attention_sms(device)
        # the decode kernel's key tile (what triton_attention launches with on this device)
        self.decode_block_n = attention_config(
            "decode", config.head_dim, self.num_q_heads // self.num_kv_heads,
            torch.cuda.get_device_name(device) if device.type == "cuda" else None).block_n
        common = dict(max_num_seqs=max_seqs, max_num_tokens=max_tokens, num_q_heads=self.num_q_heads,
                      num_kv_heads=self.num_kv_heads, num_sms=self.num_sms, sliding_window=self.sliding_window)
        # Eager steps and every CUDA graph's batch size share one plan buffer and one workspace,
        # allocated once for the largest: a captured graph's pointers never move.
        bounds = [plan_bounds(**common), *(plan_bounds(**common, capacity=b) for b in range(1, max_seqs + 1))]
        self.buffers = AttentionPlanBuffers(max(b.packed_ints for b in bounds), device)
        self.workspace = AttentionWorkspace.allocate(max(b.partial_rows for b in bounds), config.head_dim, device)
        self.tensors = None

    def plan(self, query_start_B1: np.ndarray, seq_lens_B: np.ndarray, pad_to: int | None = None) -> None:
        """Plan and upload this step's work; `pad_to` adds one-token padding sequences up to that
        many (the rows a CUDA graph of that batch size computes beside the step's)."""
        from expertmesh.model.paged_attention import plan_attention

        pad = 0 if pad_to is None else pad_to - len(seq_lens_B)
        if pad:
            T = int(query_start_B1[-1])
            query_start_B1 = np.concatenate([query_start_B1, np.arange(T + 1, T + pad + 1)])
            seq_lens_B = np.concatenate([seq_lens_B, np.ones(pad, dtype=np.int64)])
        heads = dict(num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads, num_sms=self.num_sms)
        split = decode_split_args(query_start_B1, seq_lens_B, **heads, block_n=self.decode_block_n)
        plan = plan_attention(query_start_B1, seq_lens_B, **heads, capacity=pad_to, sliding_window=self.sliding_window,
                              **split)
        self.tensors = self.buffers.upload(plan)

    def kernel_inputs(self, block_table_BM: torch.Tensor, seq_lens_B: torch.Tensor) -> PagedKernelInputs:
        return PagedKernelInputs(block_table_BM, seq_lens_B, self.tensors, self.workspace)


def paged_attention_kernel(q_THd: torch.Tensor, kv_2NSGd: torch.Tensor, meta: AttentionMetadata, scale: float,
                           sliding_window: int | None) -> torch.Tensor:
    """The CUDA path: the Triton paged kernel over `meta.kernel`. Returns [T, H*d]."""
    from expertmesh.model import triton_attention

    k = meta.kernel
    out_THd, _ = triton_attention.paged_attention(
        q_THd, kv_2NSGd, k.block_table_BM, k.seq_lens_B, meta.query_start_B1, k.plan, scale=scale,
        sliding_window=sliding_window, workspace=k.workspace)
    return out_THd.view(q_THd.shape[0], -1)


__all__ = ["Attention", "AttentionGroup", "AttentionMetadata", "PagedKernelInputs", "RotaryEmbedding",
           "decode_split_args", "paged_attention"]
