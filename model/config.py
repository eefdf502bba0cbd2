"""`ModelConfig`: the architecture of a checkpoint, read from its Hugging Face `config.json`.

One dataclass covers the four supported families; `from_hf_dict` maps each family's key names
(Hub v4 style, `rope_theta`/`rope_scaling` at the top, and transformers 5's `rope_parameters`)
onto it, so no other module ever looks at a raw config dict.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmesh.model.quantization import Fp8Config, parse_quantization_config

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3", "qwen2_moe", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    """Attention sees at most this many most recent positions (None: full causal)."""
    intermediate_size: int = 0
    """FFN width of dense layers (Qwen3 dense, or MoE models' `mlp_only_layers`)."""
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    """Renormalise the top-k gate weights to sum to 1 (Qwen3-MoE true; Mixtral always)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE's sigmoid-gated shared expert (0: none)."""
    moe_layers: tuple[int, ...] = ()
    """Indices of the layers whose FFN is a sparse MoE block; the others are dense."""
    eos_token_ids: tuple[int, ...] = ()
    quantization: Fp8Config | None = None
    """How the checkpoint's FP8 weights are scaled (`model.quantization`); None: stored as used."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model directory {str(path)!r} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{str(config_file)!r} not found: a model directory needs a config.json")
        with open(config_file) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        num_layers = hf["num_hidden_layers"]
        common = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            rope=_rope_config(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            intermediate_size=hf.get("intermediate_size", 0),
            quantization=parse_quantization_config(hf.get("quantization_config")),
            extra=hf,
        )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' is supported")
        if model_type in ("qwen3", "qwen3_moe"):
            common.update(qk_norm=True, qkv_bias=bool(hf.get("attention_bias", False)),
                          o_bias=bool(hf.get("attention_bias", False)),
                          sliding_window=_qwen_window(hf))
        elif model_type == "qwen2_moe":
            common.update(qkv_bias=bool(hf.get("qkv_bias", True)), sliding_window=_qwen_window(hf))
        else:  # mixtral
            common.update(sliding_window=hf.get("sliding_window"))

        if model_type == "qwen3":
            return cls(**common)
        if model_type == "mixtral":
            num_experts = hf.get("num_local_experts", 8)
            return cls(**common, num_experts=num_experts, top_k=hf.get("num_experts_per_tok", 2),
                       moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True,
                       moe_layers=tuple(range(num_layers)))
        num_experts = hf.get("num_experts", hf.get("num_local_experts", 0))
        sparse_step = hf.get("decoder_sparse_step", 1) or 1
        dense_only = set(hf.get("mlp_only_layers") or [])
        moe_layers = tuple(
            i for i in range(num_layers)
            if i not in dense_only and num_experts > 0 and (i + 1) % sparse_step == 0
        )
        return cls(
            **common,
            num_experts=num_experts,
            top_k=hf.get("num_experts_per_tok", 0),
            moe_intermediate_size=hf.get("moe_intermediate_size", 0),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=(
                hf.get("shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
            ),
            moe_layers=moe_layers,
        )


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _qwen_window(hf: dict[str, Any]) -> int | None:
    # Qwen configs carry a sliding_window value even when it is switched off.
    if not hf.get("use_sliding_window", False):
        return None
    if hf.get("max_window_layers", hf["num_hidden_layers"]) < hf["num_hidden_layers"]:
        raise ValueError("sliding window on only some layers (max_window_layers) is not supported")
    return hf.get("sliding_window")


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "yarn" and "original_max_position_embeddings" not in params:
        raise ValueError("yarn rope_scaling needs original_max_position_embeddings")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        attention_factor=params.get("attention_factor"),
        beta_fast=params.get("beta_fast"),
        beta_slow=params.get("beta_slow"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=params.get("truncate", True),
    )
