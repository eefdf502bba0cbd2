"""FP8 checkpoints: the `quantization_config` of config.json, and FP8 weights turned back into the
model's dtype as they load.

Two layouts load:

  official fine-grained FP8 (Qwen/Qwen3-*-FP8, DeepSeek-V3; transformers' FineGrainedFP8Config):
      "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                              "weight_block_size": [128, 128]}
      name.weight            float8_e4m3fn [N, K]
      name.weight_scale_inv  float32 [ceil(N/128), ceil(K/128)]: w = q * scale_inv, per block
  llm-compressor's compressed-tensors FP8 (W8A8-FP8, FP8-Dynamic):
      "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"],
              "weights": {"num_bits": 8, "type": "float", "symmetric": true, "strategy": "channel"},
              "input_activations": {"num_bits": 8, "type": "float", "dynamic": true, "strategy": "token"}}},
          "ignore": ["lm_head", ...]}
      name.weight            float8_e4m3fn [N, K]
      name.weight_scale      float32 [N, 1] (channel), [1] (tensor) or the block grid (block)

Which modules are quantized follows the checkpoint: a weight with a scale beside it is FP8, any
other weight is read as stored (embeddings, norms, the router gate and lm_head stay bf16 in
Qwen's FP8 checkpoints). On the GPU the blocked FP8 GEMMs (prefill, large batches) quantize
activations on the fly per token and K tile of 128 (W8A8, FP8 tensor cores; for compressed-
tensors' per-token scheme, groups of 128 are finer than it asks); the decode GEMVs, bandwidth-
bound, keep activations in bf16 (W8A16). The dequantized weights here, with
`fake_quantize_activations` for W8A8, are the reference those kernels answer to; the
dequantized weights alone are the CPU path.

A config this engine cannot run is a ValueError naming the field, at start-up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite e4m3fn value: a block's scale maps its largest |w| here."""


@dataclass(frozen=True)
class Fp8Config:
    """How a checkpoint's FP8 weights are scaled (see the module docstring)."""

    method: str
    """"fp8" (official, block-scaled) or "compressed-tensors"."""
    strategy: str
    """"block", "channel" or "tensor": the shape of the scale grid of each weight."""
    block: tuple[int, int] | None
    """Rows x columns of a weight block (strategy "block")."""
    scale_suffix: str
    """The scale tensor's name beside `<module>.weight`: "weight_scale_inv" or "weight_scale"."""

    def scale_name(self, weight_name: str) -> str | None:
        """The name of the scale of checkpoint tensor `weight_name` (None if it is not a weight)."""
        if not weight_name.endswith(".weight"):
            return None
        return weight_name[: -len("weight")] + self.scale_suffix

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> torch.Tensor:
        """float32 weights of FP8 `q` [..., N, K] with its scale (leading dims: stacked experts)."""
        if q.dtype != FP8_DTYPE:
            raise ValueError(f"tensor {name!r} has a scale but is {q.dtype}, not {FP8_DTYPE} (float8 e4m3)")
        N, K = q.shape[-2:]
        lead = tuple(q.shape[:-2])
        s = scale.to(torch.float32)
        if self.strategy == "tensor":
            if s.numel() != 1:
                raise ValueError(f"scale of {name!r} has shape {tuple(scale.shape)}; a per-tensor scale has one value")
            return q.to(torch.float32) * s.reshape(())
        if self.strategy == "channel":
            if s.numel() != math.prod(lead) * N:
                raise ValueError(f"scale of {name!r} has shape {tuple(scale.shape)}; per-channel scales need "
                                 f"{N} rows")
            return q.to(torch.float32) * s.reshape(*lead, N, 1)
        bn, bk = self.block
        grid = (-(-N // bn), -(-K // bk))
        if tuple(s.shape) != lead + grid:
            raise ValueError(f"scale of {name!r} has shape {tuple(scale.shape)}; blocks of {bn}x{bk} over "
                             f"{tuple(q.shape)} need {lead + grid}")
        return dequantize_blocks(q, s, self.block)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 `q` [..., N, K] times the scale of each (block[0] x block[1]) block, `scale`
    [..., ceil(N/block[0]), ceil(K/block[1])] (partial edge blocks take their block's scale)."""
    N, K = q.shape[-2:]
    s = scale.to(torch.float32).repeat_interleave(block[0], dim=-2)[..., :N, :]
    return q.to(torch.float32) * s.repeat_interleave(block[1], dim=-1)[..., :K]


def storage_block(config: Fp8Config, in_features: int) -> tuple[int, int]:
    """The (rows, columns) block the engine keeps a weight's scales by: the checkpoint's block,
    or one row by the whole row for per-channel scales (per-tensor ones are spread over the
    rows as they load: fused weights hold several tensors, each with its own)."""
    return config.block if config.strategy == "block" else (1, in_features)


def row_scales(config: Fp8Config, q: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """The scale grid of checkpoint weight `q` [..., N, K] in `storage_block` form."""
    if q.dtype != FP8_DTYPE:
        raise ValueError(f"tensor {name!r} has a scale but is {q.dtype}, not {FP8_DTYPE} (float8 e4m3)")
    if config.strategy == "block":
        N, K = q.shape[-2:]
        bn, bk = config.block
        if tuple(scale.shape[-2:]) != (-(-N // bn), -(-K // bk)):
            raise ValueError(f"scale of {name!r} has shape {tuple(scale.shape)}; blocks of {bn}x{bk} over "
                             f"{tuple(q.shape)} need {(-(-N // bn), -(-K // bk))}")
        return scale.to(torch.float32)
    N = q.shape[-2]
    s = scale.to(torch.float32)
    if config.strategy == "tensor":
        if s.numel() != 1:
            raise ValueError(f"scale of {name!r} has shape {tuple(scale.shape)}; a per-tensor scale has one value")
        return s.reshape(1, 1).expand(N, 1).clone()
    if s.numel() != math.prod(q.shape[:-1]):
        raise ValueError(f"scale of {name!r} has shape {tuple(scale.shape)}; per-channel scales need {N} rows")
    return s.reshape(*q.shape[:-1], 1)


class Fp8Linear(torch.nn.Module):
    """nn.Linear's place for an FP8 weight on the kernel path: `weight` float8 e4m3 [N, K] and
    `weight_scale` float32, one per `block` of it. `forward` is the reference (dequantize, then
    F.linear in x's dtype); `model.layers.fast_linear` runs the kernels: the FP8 GEMV for a few
    rows, `triton_linear.linear_fp8` (a blocked GEMM, W8A8 for 16-bit x) for more."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], bias: bool, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                         requires_grad=False)
        grid = (-(-out_features // block[0]), -(-in_features // block[1]))
        self.weight_scale = torch.nn.Parameter(torch.empty(grid, dtype=torch.float32, device=device),
                                               requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_blocks(self.weight, self.weight_scale, self.block).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantized(x.dtype), self.bias)


def fp8_linear_from(linear: torch.nn.Linear, block: tuple[int, int]) -> Fp8Linear:
    """An (empty) Fp8Linear of `linear`'s shape, bias dtype and device."""
    bias = linear.bias
    return Fp8Linear(linear.in_features, linear.out_features, block, bias is not None, device=linear.weight.device,
                     dtype=None if bias is None else bias.dtype)


FP8_PARAMS = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight", "w13_EFD", "w2_EDF")
"""The model's parameters an FP8 checkpoint's weights stay FP8 in (on the kernel path)."""


def fp8_layout_problem(config: Any) -> str | None:
    """Why this model's FP8 weights cannot stay FP8 in the engine's fused parameters (None: they
    can): a scale block that straddles two fused parts (q/k/v, gate/up) has no single scale."""
    quant = config.quantization
    if quant is None:
        return "the checkpoint is not FP8"
    rows = storage_block(quant, config.hidden_size)[0]
    fused = {"q/k/v rows": (config.q_size, config.kv_size)}
    if config.intermediate_size and len(config.moe_layers) < config.num_layers:
        fused["dense gate/up rows"] = (config.intermediate_size,)
    if config.is_moe:
        fused["expert gate/up rows"] = (config.moe_intermediate_size,)
    if config.shared_expert_intermediate_size:
        fused["shared expert gate/up rows"] = (config.shared_expert_intermediate_size,)
    for what, sizes in fused.items():
        if any(size % rows for size in sizes):
            return f"FP8 blocks of {rows} rows do not divide the {what} {sizes}"
    return None


def convert_to_fp8(model: torch.nn.Module, config: Any) -> None:
    """Give the (empty, materialized) model FP8 parameters and scales where `FP8_PARAMS` says: its
    attention projections, dense and shared-expert FFNs become `Fp8Linear`, its experts FP8
    (`Experts.to_fp8`). Embeddings, norms, router gates and lm_head stay as they are."""
    from expertmesh.experts.grouped import Experts

    quant = config.quantization
    problem = fp8_layout_problem(config)
    if problem is not None:
        raise ValueError(problem)
    for module in list(model.modules()):
        if isinstance(module, Experts):
            module.to_fp8(storage_block(quant, config.hidden_size), storage_block(quant, module.intermediate_size))
            continue
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            linear = getattr(module, name, None)
            if isinstance(linear, torch.nn.Linear):
                setattr(module, name, fp8_linear_from(linear, storage_block(quant, linear.in_features)))


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weights, float32 scale_inv grid) of `w` [N, K], one scale per block of `block`, as the
    official FP8 checkpoints store them (a block's largest |w| maps to 448; edge blocks may be
    partial). make-tiny --fp8 writes its checkpoints with it."""
    N, K = w.shape
    bn, bk = block
    rows, cols = -(-N // bn), -(-K // bk)
    padded = torch.zeros(rows * bn, cols * bk, dtype=torch.float32, device=w.device)
    padded[:N, :K] = w.to(torch.float32)
    blocks = padded.view(rows, bn, cols, bk)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(rows * bn, cols * bk)[:N, :K]
    return q.to(FP8_DTYPE).contiguous(), scale_inv.contiguous()


def quantize_channels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weights, float32 scale [N, 1]) of `w` [N, K], one scale per output row
    (compressed-tensors' "channel" strategy)."""
    amax = w.to(torch.float32).abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE).contiguous(), scale.contiguous()


def quantize_activation_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 values, float32 scales [T, ceil(K/group)]) of activations `x` [T, K], one scale per
    token and group of `group` features (amax/448, amax clamped at 1e-10): what the W8A8 kernels
    (experts/triton_fp8.py's quantize_rows) do to each K tile of activations before the FP8 tensor cores."""
    T, K = x.shape
    groups = -(-K // group)
    padded = torch.zeros(T, groups * group, dtype=torch.float32, device=x.device)
    padded[:, :K] = x.to(torch.float32)
    view = padded.view(T, groups, group)
    scale = view.abs().amax(dim=2).clamp(min=1e-10) / FP8_MAX
    q = (view / scale[:, :, None]).view(T, groups * group)[:, :K]
    return q.to(FP8_DTYPE), scale


def fake_quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """`x` as the W8A8 kernels see it, in float32: quantized per token group, then scaled back.
    With the dequantized weights, the reference of the W8A8 GEMMs."""
    q, scale = quantize_activation_groups(x, group)
    return q.to(torch.float32) * scale.repeat_interleave(group, dim=1)[:, :x.shape[1]]


def parse_quantization_config(qc: dict[str, Any] | None) -> Fp8Config | None:
    """The Fp8Config of a config.json's `quantization_config` (None when it has none); a
    ValueError naming the field for anything this engine cannot load."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "fp8":
        return _official_fp8(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported; expertmesh loads 'fp8' "
                     "(fine-grained, block-scaled e4m3) and 'compressed-tensors' (FP8 float-quantized)")


def _official_fp8(qc: dict[str, Any]) -> Fp8Config:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt {fmt!r} is not supported; FP8 weights must be 'e4m3'")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme {scheme!r} is not supported; only 'dynamic' "
                         "(activations scaled per token group as they are computed)")
    block = qc.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers such as "
                         f"[128, 128], got {block!r}")
    return Fp8Config(method="fp8", strategy="block", block=(block[0], block[1]), scale_suffix="weight_scale_inv")


def _compressed_tensors(qc: dict[str, Any]) -> Fp8Config:
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ValueError(f"quantization_config.format {fmt!r} is not supported; compressed-tensors checkpoints "
                         "load in 'float-quantized' (FP8) format")
    if qc.get("kv_cache_scheme") is not None:
        raise ValueError("quantization_config.kv_cache_scheme is not supported: the KV cache stays in the "
                         "model's dtype (drop the FP8 KV-cache scales from the checkpoint's config)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("quantization_config.config_groups must name at least one quantization group")
    configs = set()
    for name, group in groups.items():
        field = f"quantization_config.config_groups.{name}"
        if not isinstance(group, dict):
            raise ValueError(f"{field} must be an object")
        targets = group.get("targets")
        if targets != ["Linear"]:
            raise ValueError(f"{field}.targets {targets!r} is not supported; FP8 groups must target ['Linear']")
        configs.add(_ct_weights(group.get("weights"), f"{field}.weights"))
        _ct_activations(group.get("input_activations"), f"{field}.input_activations")
        if group.get("output_activations") is not None:
            raise ValueError(f"{field}.output_activations is not supported")
    if len(configs) > 1:
        raise ValueError("quantization_config.config_groups quantize weights in more than one way; "
                         "one FP8 weight scheme per checkpoint is supported")
    return configs.pop()


def _ct_weights(w: Any, field: str) -> Fp8Config:
    if not isinstance(w, dict):
        raise ValueError(f"{field} must describe the weights' quantization")
    if w.get("num_bits") != 8 or w.get("type") != "float":
        raise ValueError(f"{field} quantizes to {w.get('num_bits')}-bit {w.get('type')}; only 8-bit float "
                         "(FP8 e4m3) is supported")
    if not w.get("symmetric", True):
        raise ValueError(f"{field}.symmetric false (zero points) is not supported for FP8")
    if w.get("dynamic", False):
        raise ValueError(f"{field}.dynamic true is not supported: FP8 weights carry their scales")
    strategy = w.get("strategy")
    if strategy in ("channel", "tensor"):
        return Fp8Config(method="compressed-tensors", strategy=strategy, block=None, scale_suffix="weight_scale")
    if strategy == "block":
        block = w.get("block_structure")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"{field}.block_structure must be two positive integers, got {block!r}")
        return Fp8Config(method="compressed-tensors", strategy="block", block=(block[0], block[1]),
                         scale_suffix="weight_scale")
    raise ValueError(f"{field}.strategy {strategy!r} is not supported; FP8 weights scale per 'channel', "
                     "'tensor' or 'block'")


def _ct_activations(a: Any, field: str) -> None:
    if a is None:
        return  # weight-only FP8
    if not isinstance(a, dict):
        raise ValueError(f"{field} must be an object")
    if a.get("num_bits") != 8 or a.get("type") != "float":
        raise ValueError(f"{field} quantizes to {a.get('num_bits')}-bit {a.get('type')}; only 8-bit float")
    if not a.get("dynamic", False):
        raise ValueError(f"{field}.dynamic false (static input scales) is not supported; FP8 activations are "
                         "scaled per token as they are computed")


__all__ = ["FP8_DTYPE", "FP8_MAX", "FP8_PARAMS", "Fp8Config", "Fp8Linear", "convert_to_fp8", "dequantize_blocks",
           "fp8_layout_problem", "fp8_linear_from",
           "parse_quantization_config", "quantize_blocks", "quantize_channels", "row_scales", "storage_block"]
