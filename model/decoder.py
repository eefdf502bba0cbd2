"""Decoder assembly for Qwen3-MoE, Qwen3 dense, Qwen2-MoE and Mixtral over a flat token batch.

    input_ids_T ─ embed ─▶ [ RMSNorm ─ attention(paged KV) ─ + ─ RMSNorm ─ MoE or MLP ─ + ] x L
                                                                    ─ RMSNorm ─▶ hidden_TD
    compute_logits(hidden of the rows that sample) ─ lm_head ─▶ logits (float32)

Each layer hands the next its sublayer output and the running residual separately, so every
"+ then RMSNorm" is one fused op on the fast path (`RMSNorm(x, residual)`).

A rank builds the model with the global ids of the experts it owns (`expert_ids`, None = all)
and a dispatcher; the model itself never communicates. `kernels` picks the plain-torch paths
("torch": the CPU path and the oracle) or the CUDA fast paths ("triton": fused small ops, the
paged-attention kernel, the fused MoE); "auto" takes the fast paths on CUDA when triton is there.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import nn

from expertmesh.model.attention import Attention, AttentionMetadata
from expertmesh.model.config import ModelConfig
from expertmesh.model.layers import DenseMLP, RMSNorm, RotaryEmbedding
from expertmesh.model.moe import SparseMoeBlock
from expertmesh.model.quantization import FP8_DTYPE, convert_to_fp8
from expertmesh.router import ExpertLoadStats, LocalDispatcher

KERNELS = ("auto", "triton", "torch")


def use_fast_kernels(kernels: str, device: torch.device | str) -> bool:
    """Whether `kernels` ("auto", "triton" or "torch") means the Triton fast paths on `device`."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    if kernels == "triton":  # on a CPU only under Triton's interpreter (tests): asked for, not chosen
        if not has_triton:
            raise ValueError("kernels='triton' needs triton installed")
        return True
    return kernels == "auto" and torch.device(device).type == "cuda" and has_triton


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, mlp: nn.Module, rotary: RotaryEmbedding,
                 fast: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fast=fast)
        self.attn = Attention(config, rotary, fast=fast)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fast=fast)
        self.mlp = mlp

    def forward(self, x_TD, residual_TD, rope_cos_sin, kv_2NSGd,
                meta: AttentionMetadata | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sublayer output, residual) of the previous layer -> this layer's; residual None on layer 0."""
        if residual_TD is None:
            h_TD, residual_TD = self.input_layernorm(x_TD), x_TD
        else:
            h_TD, residual_TD = self.input_layernorm(x_TD, residual_TD)
        if meta is not None:  # None: this rank has no tokens and only joins the MoE exchanges
            h_TD = self.attn(h_TD, rope_cos_sin, kv_2NSGd, meta)
        else:
            h_TD = torch.zeros_like(h_TD)
        h_TD, residual_TD = self.post_attention_layernorm(h_TD, residual_TD)
        return self.mlp(h_TD), residual_TD


class CausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        expert_ids: Sequence[int] | None = None,
        dispatcher=None,
        expert_impl: str = "auto",
        kernels: str = "auto",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        fp8_weights: bool = False,
    ) -> None:
        """`fp8_weights`: keep an FP8 checkpoint's linear layers in FP8 with their scales
        (`model.quantization.convert_to_fp8`; the kernel path reads them); otherwise they load
        dequantized into `dtype`."""
        super().__init__()
        self.config = config
        self.fast = fast = use_fast_kernels(kernels, device)
        self.expert_ids = list(range(config.num_experts)) if expert_ids is None else list(expert_ids)
        self.expert_load = (ExpertLoadStats(len(config.moe_layers), config.num_experts, device)
                            if config.is_moe else None)
        if dispatcher is None and config.is_moe:
            expert_to_local = torch.full((config.num_experts,), -1, dtype=torch.int64)
            expert_to_local[self.expert_ids] = torch.arange(len(self.expert_ids))
            dispatcher = LocalDispatcher(expert_to_local.to(device))
        self.dispatcher = dispatcher
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings).to(device)
        # Built on the meta device, then given uninitialised storage of the target dtype on the
        # target device: no random init, no float32 copy of a large model. The loader fills it.
        with torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            layers = []
            for i in range(config.num_layers):
                if i in config.moe_layers:
                    mlp = SparseMoeBlock(config, len(self.expert_ids), config.moe_layers.index(i),
                                         dispatcher=dispatcher, stats=self.expert_load,
                                         expert_impl=expert_impl, fast=fast, device=device, dtype=dtype)
                else:
                    mlp = DenseMLP(config.hidden_size, config.intermediate_size, fast=fast)
                layers.append(DecoderLayer(config, i, mlp, self.rotary, fast=fast))
            self.layers = nn.ModuleList(layers)
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, fast=fast)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if fp8_weights:  # still on meta: the bf16 copies are never allocated
                if not fast:
                    raise ValueError("FP8 weights are read by the Triton kernels only (kernels 'auto' on CUDA, "
                                     "or 'triton')")
                convert_to_fp8(self, config)
        _materialize(self, device, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self, input_ids_T: torch.Tensor, meta: AttentionMetadata | None, kv_caches: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Hidden states [T, D] of a flat batch; kv_caches[i] is layer i's [2, N, S, G, d].
        With meta None (and T = 0) the layers skip attention: an idle rank's pass through the
        MoE exchanges under expert parallelism."""
        x_TD = self.embed_tokens(input_ids_T)
        # cos/sin once per step for every layer (the fast path computes them inside its rope kernel)
        rope_cos_sin = None if meta is None or self.fast else self.rotary(meta.positions_T, x_TD.dtype)
        residual_TD = None
        for layer, kv in zip(self.layers, kv_caches):
            x_TD, residual_TD = layer(x_TD, residual_TD, rope_cos_sin, kv, meta)
        return self.norm(x_TD) if residual_TD is None else self.norm(x_TD, residual_TD)[0]

    def compute_logits(self, hidden_BD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_BD).float()


def _materialize(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Storage for every parameter on `device`: `dtype`, except FP8 weights and their float32
    scales (`convert_to_fp8`), which keep theirs."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                keep = param.dtype == FP8_DTYPE or name.endswith("_scale")
                sub._parameters[name] = nn.Parameter(
                    torch.empty(param.shape, device=device, dtype=param.dtype if keep else dtype),
                    requires_grad=False)
