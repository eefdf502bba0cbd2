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

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.model.config import ModelConfig
from expertmesh.model.layers import RMSNorm, RotaryEmbedding, apply_rope, rms_normalize


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs, on the model's device.

    positions_T:     position of each token in its sequence (int64).
    slot_mapping_T:  KV slot each token's k/v is written to (int64).
    block_table_BM:  KV block ids of each sequence, padded with 0 (int64; padding is masked).
    seq_lens_B:      keys each sequence has after this step (cached + new).
    query_start_B1:  offsets of each sequence's tokens in the flat batch (int64, B+1 entries).
    q_pad_index_T:   where each token sits in the padded [B*Q] query layout.
    mask_B1QL:       True where a (query, key) pair may attend (causal, in-sequence, window).
    max_query_len:   Q.
    prefill_only:    no sequence has cached keys (every start is 0): attention reads the step's
                     own k/v, padded like the queries, and the mask is [B, 1, Q, Q].
    """

    positions_T: torch.Tensor
    slot_mapping_T: torch.Tensor
    block_table_BM: torch.Tensor
    seq_lens_B: torch.Tensor
    query_start_B1: torch.Tensor
    q_pad_index_T: torch.Tensor
    mask_B1QL: torch.Tensor
    max_query_len: int
    prefill_only: bool = False

    @classmethod
    def build(
        cls,
        *,
        query_lens: list[int],
        starts: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        sliding_window: int | None = None,
    ) -> AttentionMetadata:
        """From plain per-sequence lists: tokens this step, first position, block ids.
        Index arithmetic runs in numpy on the host; one copy to the device; the mask is built there."""
        B = len(query_lens)
        Q = max(query_lens)
        M = max(len(t) for t in block_tables)
        query_lens_B = np.asarray(query_lens, dtype=np.int64)
        starts_B = np.asarray(starts, dtype=np.int64)
        block_table_BM = np.zeros((B, M), dtype=np.int64)
        for i, table in enumerate(block_tables):
            block_table_BM[i, : len(table)] = table
        query_start_B1 = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(query_lens_B, out=query_start_B1[1:])
        T = int(query_start_B1[-1])
        seq_of_T = np.repeat(np.arange(B), query_lens_B)
        offset_T = np.arange(T) - query_start_B1[:-1][seq_of_T]
        positions_T = starts_B[seq_of_T] + offset_T
        slot_mapping_T = block_table_BM[seq_of_T, positions_T // block_size] * block_size + positions_T % block_size
        q_pad_index_T = seq_of_T * Q + offset_T
        # Query position per padded row; padding rows look at key 0 only, so softmax stays finite.
        q_pos_BQ = starts_B[:, None] + np.arange(Q)[None, :]
        q_pos_BQ = np.where(np.arange(Q)[None, :] < query_lens_B[:, None], q_pos_BQ, 0)
        prefill_only = not starts_B.any()
        num_keys = Q if prefill_only else M * block_size
        if device.type == "cpu":
            pieces = [torch.from_numpy(a) for a in
                      (positions_T, slot_mapping_T, block_table_BM, starts_B + query_lens_B, query_start_B1,
                       q_pad_index_T, q_pos_BQ)]
        else:  # one host-to-device copy for all index tensors, cut into views on the device
            flat = np.concatenate([a.reshape(-1) for a in (positions_T, slot_mapping_T, block_table_BM,
                                                           starts_B + query_lens_B, query_start_B1,
                                                           q_pad_index_T, q_pos_BQ)])
            sizes = [T, T, B * M, B, B + 1, T, B * Q]
            pieces = list(torch.from_numpy(flat).pin_memory().to(device, non_blocking=True).split(sizes))
        positions, slots, table, seq_lens, query_start, q_pad, q_pos = pieces
        q_pos_BQ_dev = q_pos.view(B, Q)
        key_pos_L = torch.arange(num_keys, device=device)
        mask_BQL = key_pos_L[None, None, :] <= q_pos_BQ_dev[:, :, None]
        if sliding_window is not None:
            mask_BQL &= key_pos_L[None, None, :] > q_pos_BQ_dev[:, :, None] - sliding_window
        return cls(
            positions_T=positions,
            slot_mapping_T=slots,
            block_table_BM=table.view(B, M),
            seq_lens_B=seq_lens,
            query_start_B1=query_start,
            q_pad_index_T=q_pad,
            mask_B1QL=mask_BQL[:, None],
            max_query_len=Q,
            prefill_only=prefill_only,
        )


def paged_attention(
    q_THd: torch.Tensor, k_TGd: torch.Tensor, v_TGd: torch.Tensor, kv_2NSGd: torch.Tensor,
    meta: AttentionMetadata, scale: float,
) -> torch.Tensor:
    """Reference paged attention with torch SDPA. Keys come from each sequence's blocks (K and V
    in one gather), or, when no sequence has cached context, straight from this step's k/v.
    Queries are padded to Q; a decode-only step (Q = 1) needs no padding."""
    _, H, d = q_THd.shape
    B, M = meta.block_table_BM.shape
    _, _, S, G, _ = kv_2NSGd.shape
    Q = meta.max_query_len

    def pad(x_TXd: torch.Tensor) -> torch.Tensor:  # [T, X, d] -> [B, X, Q, d]
        padded = x_TXd.new_zeros(B * Q, x_TXd.shape[1], d).index_copy_(0, meta.q_pad_index_T, x_TXd)
        return padded.view(B, Q, -1, d).transpose(1, 2)

    if meta.prefill_only:
        k_BGLd, v_BGLd = pad(k_TGd), pad(v_TGd)
    else:
        # index_select on a flat view: several times faster than advanced indexing for this gather.
        blocks = kv_2NSGd.view(2, kv_2NSGd.shape[1], -1).index_select(1, meta.block_table_BM.view(-1))
        kv_2BGLd = blocks.view(2, B, M * S, G, d).transpose(2, 3)
        k_BGLd, v_BGLd = kv_2BGLd[0], kv_2BGLd[1]
    q_BHQd = q_THd[:, :, None, :] if Q == 1 else pad(q_THd)
    out_BHQd = F.scaled_dot_product_attention(
        q_BHQd, k_BGLd, v_BGLd, attn_mask=meta.mask_B1QL, scale=scale, enable_gqa=H != G
    )
    if Q == 1:
        return out_BHQd.reshape(B, H * d)
    return out_BHQd.transpose(1, 2).reshape(B * Q, H * d).index_select(0, meta.q_pad_index_T)


class Attention(nn.Module):
    """GQA self-attention with optional QK-norm (Qwen3) and q/k/v bias (Qwen2), fused qkv GEMM."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
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

    def forward(
        self,
        x_TD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_2NSGd: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        T = x_TD.shape[0]
        H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
        # q and k heads sit side by side in the qkv output: normalise and rotate them together.
        qkv_T3d = self.qkv_proj(x_TD).view(T, H + 2 * G, d)
        qk_THd, v_TGd = qkv_T3d[:, : H + G], qkv_T3d[:, H + G:]
        if self.q_norm is not None:
            qk_THd = self._qk_norm_weight() * rms_normalize(qk_THd, self.eps)
        cos, sin = rope_cos_sin
        qk_THd = apply_rope(qk_THd, cos, sin)
        q_THd, k_TGd = qk_THd[:, :H], qk_THd[:, H:]
        k_TGd, v_TGd = k_TGd.to(kv_2NSGd.dtype), v_TGd.to(kv_2NSGd.dtype)
        slots = kv_2NSGd.view(2, -1, G, d)
        slots[0].index_copy_(0, meta.slot_mapping_T, k_TGd)
        slots[1].index_copy_(0, meta.slot_mapping_T, v_TGd)
        return self.o_proj(paged_attention(q_THd, k_TGd, v_TGd, kv_2NSGd, meta, self.scale))


__all__ = ["Attention", "AttentionMetadata", "RotaryEmbedding", "paged_attention"]
