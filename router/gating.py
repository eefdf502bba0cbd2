"""Gating: router logits -> the top-k experts of each token and their weights.

Legend: T tokens, E experts (global), K experts per token.

Both functions return (`topk_weights_TK` float32, `topk_ids_TK` int64, global expert ids).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GateConfig:
    top_k: int
    renormalize: bool
    """Qwen3-MoE (norm_topk_prob) and Mixtral: the k weights sum to 1. Qwen2-MoE: raw softmax."""
    scoring: str = "softmax_topk"
    """"softmax_topk" (Qwen: softmax over all experts, then top-k) or "topk_softmax" (Mixtral's
    order: top-k logits, then softmax over the k; equal to softmax_topk with renormalisation)."""


def softmax_topk(logits_TE: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK


def topk_softmax(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top_logits_TK, ids_TK = torch.topk(logits_TE.float(), top_k, dim=-1)
    return torch.softmax(top_logits_TK, dim=-1), ids_TK


def gate(logits_TE: torch.Tensor, config: GateConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if config.scoring == "topk_softmax":
        return topk_softmax(logits_TE, config.top_k)
    return softmax_topk(logits_TE, config.top_k, config.renormalize)
