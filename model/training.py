"""A training-mode forward over `CausalLM`'s own parameters: padded batches, autograd, router logits.

The serving forward (`CausalLM.forward`) writes k/v into a paged cache and reads them back, and
its MoE path sorts tokens and counts expert load; none of that belongs in a training step. This
forward reuses the same modules and the same math pieces (`rms_normalize`, `apply_rope`, `gate`,
`Experts.dense`) on a [B, S] batch of right-padded sequences starting at position 0:

    ids_BS ─ embed ─▶ [ RMSNorm ─ causal SDPA (QK-norm, rope, GQA) ─ + ─ RMSNorm ─ MoE ─ + ] x L ─ RMSNorm

Every expert sees every token, weighted by the top-k routing weights (zero elsewhere): the same
sum as the dispatch path, on dense GEMMs that autograd and a GPU handle well at toy sizes. The
model must be built with kernels="torch" (the plain paths). `tests/test_demo.py` holds it to the
serving forward's logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmesh.model.attention import Attention
from expertmesh.model.decoder import CausalLM
from expertmesh.model.layers import apply_rope, rms_normalize
from expertmesh.model.moe import SparseMoeBlock
from expertmesh.router import gate


def _attention(attn: Attention, h_BSD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    B, S, _ = h_BSD.shape
    H, G, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = attn.qkv_proj(h_BSD).view(B * S, H + 2 * G, d)
    qk, v = qkv[:, : H + G], qkv[:, H + G:]
    if attn.q_norm is not None and attn.k_norm is not None:
        weight = torch.cat((attn.q_norm.weight.expand(H, -1), attn.k_norm.weight.expand(G, -1)))
        qk = weight * rms_normalize(qk, attn.eps)
    qk = apply_rope(qk, *cos_sin)
    q = qk[:, :H].view(B, S, H, d).transpose(1, 2)
    k = qk[:, H:].view(B, S, G, d).transpose(1, 2)
    v = v.reshape(B, S, G, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale, enable_gqa=G != H)
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, H * d))


def _moe(block: SparseMoeBlock, h_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits_TE = block.gate(h_TD)
    weights_TK, ids_TK = gate(logits_TE, block.gate_config)
    weights_TE = torch.zeros_like(logits_TE, dtype=weights_TK.dtype).scatter(1, ids_TK, weights_TK)
    out_TD = block.experts.dense(h_TD, weights_TE)
    if block.shared_expert is not None:
        out_TD = out_TD + torch.sigmoid(block.shared_expert_gate(h_TD)) * block.shared_expert(h_TD)
    return out_TD, logits_TE


def training_forward(model: CausalLM, ids_BS: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final hidden states [B, S, D], router logits [B*S, E] of each MoE layer)."""
    if model.fast:
        raise ValueError("training_forward runs the plain-torch paths: build the model with kernels='torch'")
    B, S = ids_BS.shape
    x = model.embed_tokens(ids_BS)
    positions_T = torch.arange(S, device=ids_BS.device).repeat(B)
    cos_sin = model.rotary(positions_T, x.dtype)
    residual, router_logits = None, []
    for layer in model.layers:
        if residual is None:
            h, residual = layer.input_layernorm(x), x
        else:
            h, residual = layer.input_layernorm(x, residual)
        h = _attention(layer.attn, h, cos_sin)
        h, residual = layer.post_attention_layernorm(h, residual)
        if isinstance(layer.mlp, SparseMoeBlock):
            out, logits = _moe(layer.mlp, h.reshape(B * S, -1))
            router_logits.append(logits)
            x = out.view(B, S, -1)
        else:
            x = layer.mlp(h)
    return model.norm(x, residual)[0], router_logits


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int,
                        mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch/Qwen3-MoE auxiliary loss: E * sum_e (share of routed slots to e) * (mean router
    probability of e), over every MoE layer's tokens together; padding rows (mask 0) left out.
    top_k when routing is uniform (transformers' load_balancing_loss_func); `router_aux_loss_coef` weighs it."""
    logits = torch.cat(router_logits).float()
    E = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    slots = F.one_hot(chosen, E).float()  # [N, K, E]
    if mask_T is None:
        return E * (slots.mean(0) * probs.mean(0)).sum()
    m = mask_T.float().repeat(len(router_logits))
    share = (slots * m[:, None, None]).sum(0) / m.sum()
    prob = (probs * m[:, None]).sum(0) / m.sum()
    return E * (share * prob).sum()
