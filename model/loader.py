"""Checkpoint loading through one declarative name table.

Each `Rule` maps a Hugging Face tensor name (with `{L}` layer and `{E}` expert placeholders)
to one of our parameters, optionally into one part of a fused parameter (q/k/v into qkv_proj,
gate/up into gate_up_proj or w13) or into one local expert's slice of a stacked tensor:

    model.layers.{L}.self_attn.k_proj.weight   -> layers.{L}.attn.qkv_proj.weight, part 1 of (q, k, v)
    model.layers.{L}.mlp.experts.{E}.up_proj.weight -> layers.{L}.mlp.experts.w13_EFD[local(E)], part 1 of (gate, up)

A rank passes the global ids of the experts it owns; tensors of other experts are never read.
Loading proves every tensor of the checkpoint was used (or belongs to an expert this rank does
not own) and every parameter element was filled, and names the key when either fails.
"""
from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from expertmesh.model.config import ModelConfig
from expertmesh.model.quantization import FP8_DTYPE, FP8_MAX, FP8_PARAMS, row_scales, storage_block


@dataclass(frozen=True)
class Rule:
    hf: str
    """Checkpoint name pattern; {L} layer, {E} expert."""
    param: str
    """Our parameter name pattern; {L} layer."""
    part: int = 0
    part_rows: tuple[int, ...] = ()
    """For fused parameters: the rows of each part along dim 0 (of each expert's slice, for
    expert parameters); the tensor fills part `part`. Empty: the tensor fills the parameter."""
    per_expert: bool = False
    """`{E}` names one expert: the tensor goes to that expert's local slot."""
    stacked_experts: bool = False
    """The tensor holds all experts stacked on dim 0 (transformers 5's fused layout)."""


def weight_rules(config: ModelConfig) -> list[Rule]:
    L = "model.layers.{L}"
    rules = [
        Rule("model.embed_tokens.weight", "embed_tokens.weight"),
        Rule("model.norm.weight", "norm.weight"),
        Rule(f"{L}.input_layernorm.weight", "layers.{L}.input_layernorm.weight"),
        Rule(f"{L}.post_attention_layernorm.weight", "layers.{L}.post_attention_layernorm.weight"),
        Rule(f"{L}.self_attn.o_proj.weight", "layers.{L}.attn.o_proj.weight"),
    ]
    if not config.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", "lm_head.weight"))
    qkv_rows = (config.q_size, config.kv_size, config.kv_size)
    suffixes = ["weight"] + (["bias"] if config.qkv_bias else [])
    for suffix in suffixes:
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rules.append(Rule(f"{L}.self_attn.{name}.{suffix}", "layers.{L}.attn.qkv_proj." + suffix, part, qkv_rows))
    if config.o_bias:
        rules.append(Rule(f"{L}.self_attn.o_proj.bias", "layers.{L}.attn.o_proj.bias"))
    if config.qk_norm:
        rules += [Rule(f"{L}.self_attn.q_norm.weight", "layers.{L}.attn.q_norm.weight"),
                  Rule(f"{L}.self_attn.k_norm.weight", "layers.{L}.attn.k_norm.weight")]
    rules += _mlp_rules(f"{L}.mlp", "layers.{L}.mlp", config.intermediate_size)  # dense layers
    if config.model_type == "mixtral":
        moe = f"{L}.block_sparse_moe"
        rules += _expert_rules(moe, ("w1", "w3", "w2"), config.moe_intermediate_size)
    elif config.is_moe:
        moe = f"{L}.mlp"
        rules += _expert_rules(moe, ("gate_proj", "up_proj", "down_proj"), config.moe_intermediate_size)
        rules += [  # transformers 5's in-memory layout, all experts stacked
            Rule(f"{moe}.experts.gate_up_proj", "layers.{L}.mlp.experts.w13_EFD", stacked_experts=True),
            Rule(f"{moe}.experts.down_proj", "layers.{L}.mlp.experts.w2_EDF", stacked_experts=True),
        ]
        if config.shared_expert_intermediate_size:
            rules += _mlp_rules(f"{moe}.shared_expert", "layers.{L}.mlp.shared_expert",
                                config.shared_expert_intermediate_size)
            rules.append(Rule(f"{moe}.shared_expert_gate.weight", "layers.{L}.mlp.shared_expert_gate.weight"))
    return rules


def _expert_rules(hf_moe: str, names: tuple[str, str, str], intermediate_size: int) -> list[Rule]:
    """Router and per-expert tensors; `names` are the checkpoint's (gate, up, down) names."""
    gate, up, down = names
    w13 = (intermediate_size, intermediate_size)
    experts = hf_moe + ".experts.{E}"
    return [
        Rule(f"{hf_moe}.gate.weight", "layers.{L}.mlp.gate.weight"),
        Rule(f"{experts}.{gate}.weight", "layers.{L}.mlp.experts.w13_EFD", 0, w13, per_expert=True),
        Rule(f"{experts}.{up}.weight", "layers.{L}.mlp.experts.w13_EFD", 1, w13, per_expert=True),
        Rule(f"{experts}.{down}.weight", "layers.{L}.mlp.experts.w2_EDF", per_expert=True),
    ]


def _mlp_rules(hf_prefix: str, prefix: str, intermediate_size: int) -> list[Rule]:
    rows = (intermediate_size, intermediate_size)
    return [
        Rule(f"{hf_prefix}.gate_proj.weight", f"{prefix}.gate_up_proj.weight", 0, rows),
        Rule(f"{hf_prefix}.up_proj.weight", f"{prefix}.gate_up_proj.weight", 1, rows),
        Rule(f"{hf_prefix}.down_proj.weight", f"{prefix}.down_proj.weight"),
    ]


IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or shards with an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in {str(path)!r}")
    names = {}
    for file in files:
        with safe_open(file, "pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def load_weights(model: torch.nn.Module, path: str | Path, config: ModelConfig,
                 expert_ids: list[int] | None = None, progress: bool = True) -> None:
    """Fill every parameter of `model` from the checkpoint at `path` (see the module docstring)."""
    path = Path(path)
    expert_ids = list(range(config.num_experts)) if expert_ids is None else list(expert_ids)
    local_slot: dict[int, list[int]] = defaultdict(list)  # an expert may fill several slots (redundant copies)
    for i, e in enumerate(expert_ids):
        local_slot[e].append(i)
    params = dict(model.named_parameters(remove_duplicate=False))
    matchers = [(_compile(rule.hf), rule) for rule in weight_rules(config)]
    filled: dict[str, set] = defaultdict(set)
    unexpected: list[str] = []
    by_file: dict[Path, list[str]] = defaultdict(list)
    files = checkpoint_files(path)
    for name, file in files.items():
        by_file[file].append(name)

    fp8 = Fp8Weights(config, files)
    try:
        _load_files(by_file, fp8, matchers, params, expert_ids, local_slot, config, filled, unexpected, progress)
    finally:
        fp8.close()
    unexpected += fp8.orphan_scales()
    if unexpected:
        raise ValueError(f"checkpoint {str(path)!r} has tensors this {config.model_type} model does not use: "
                         f"{', '.join(sorted(unexpected)[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    missing = _missing(params, filled, matchers, len(expert_ids), expert_ids)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is missing tensor(s): "
                         f"{', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))


def _load_files(by_file, fp8, matchers, params, expert_ids, local_slot, config, filled, unexpected, progress) -> None:
    """The sweep of `load_weights`: every tensor of every shard to its parameter (or the lists)."""
    bar = tqdm(total=sum(len(v) for v in by_file.values()), desc="Loading weights", unit="tensor",
               disable=not progress)
    for file, names in sorted(by_file.items()):
        f = fp8.handle(file)  # one open handle per shard, shared with the scales read beside weights
        for name in sorted(names):
            bar.update()
            if fp8.is_scale(name):
                continue  # read beside its weight
            match = _match(matchers, name)
            if match is None and name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some tied checkpoints still carry the copy
            if match is None:
                if not IGNORED.match(name):
                    unexpected.append(name)
                continue
            rule, groups = match
            target = rule.param.format(L=groups.get("L"))
            if target not in params:
                unexpected.append(name)
                continue
            param, scale = params[target], params.get(target + "_scale")
            if rule.stacked_experts:
                for slot, expert in enumerate(expert_ids):
                    fp8.fill(param[slot], None if scale is None else scale[slot], f, name, rule, expert=expert)
                    filled[target].add((slot, "whole"))
            elif rule.per_expert:
                expert = int(groups["E"])
                if expert not in local_slot:
                    if expert >= config.num_experts:
                        unexpected.append(name)
                    continue  # another rank's expert: never read
                for slot in local_slot[expert]:
                    fp8.fill(param[slot], None if scale is None else scale[slot], f, name, rule)
                    filled[target].add((slot, rule.part))
            else:
                fp8.fill(param, scale, f, name, rule)
                filled[target].add((None, rule.part))
    bar.close()


class Fp8Weights:
    """The FP8 side of loading (`model.quantization`): which checkpoint tensors are scales, and each
    weight read as the model's values: an FP8 weight with its scale (from whichever shard holds
    it) dequantized, any other tensor as stored. EP ranks read only their experts' weights and
    scales. A float8 tensor without a scale, or a scale without its weight, is an error."""

    def __init__(self, config: ModelConfig, files: dict[str, Path]) -> None:
        self.quant = config.quantization
        self.files = files
        suffix = self.quant.scale_suffix if self.quant else None
        self.scales = {name for name in files if suffix and name.endswith("." + suffix)}
        self._open = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}

    def close(self) -> None:
        self._open.close()
        self._handles.clear()

    def handle(self, file: Path):
        """One open handle per shard for the whole load (a scale may sit in another shard)."""
        if file not in self._handles:
            self._handles[file] = self._open.enter_context(safe_open(file, "pt"))
        return self._handles[file]

    def is_scale(self, name: str) -> bool:
        return name in self.scales

    def fill(self, dest: torch.Tensor, dest_scale: torch.Tensor | None, f, name: str, rule: Rule,
             expert: int | None = None) -> None:
        """Copy tensor `name` of open file `f` (one expert's slice of a stacked tensor if `expert`)
        into `dest` (its part `rule` says): dequantized when `dest` is not FP8; as FP8 with its
        scales into the rows of `dest_scale` that part covers when it is."""
        tensor = f.get_tensor(name) if expert is None else f.get_slice(name)[expert]
        scale_name = self.quant.scale_name(name) if self.quant else None
        if scale_name is None or scale_name not in self.scales:
            if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                hint = ("config.json has no quantization_config" if not self.quant else
                        f"the checkpoint has no {scale_name!r} beside it" if scale_name else
                        "FP8 loads only as `<module>.weight` tensors with their scales")
                raise ValueError(f"tensor {name!r} is {tensor.dtype} but {hint}")
            if dest_scale is not None:
                raise ValueError(f"tensor {name!r} is not FP8, but the engine keeps it in FP8 "
                                 "(load_weights' caller should have checked `fp8_covers`)")
            _copy(dest, tensor, rule, name)
            return
        g = self.handle(self.files[scale_name])
        scale = g.get_tensor(scale_name) if expert is None else g.get_slice(scale_name)[expert]
        if dest_scale is None:
            _copy(dest, self.quant.dequantize(tensor, scale, name), rule, name)
            return
        _copy(dest, tensor, rule, name)
        grid = row_scales(self.quant, tensor, scale, name)
        if rule.part_rows:  # the part's rows of the fused grid (fp8_layout_problem: whole blocks)
            rows = storage_block(self.quant, tensor.shape[-1])[0]
            first, count = sum(rule.part_rows[: rule.part]) // rows, rule.part_rows[rule.part] // rows
            dest_scale = dest_scale.narrow(0, first, count)
        if tuple(grid.shape) != tuple(dest_scale.shape):
            raise ValueError(f"the scales of {name!r} form a {tuple(grid.shape)} grid, the engine expects "
                             f"{tuple(dest_scale.shape)}")
        dest_scale.copy_(grid)

    def orphan_scales(self) -> list[str]:
        """Scales whose weight the checkpoint lacks."""
        cut = len(self.quant.scale_suffix) if self.quant else 0
        return sorted(s for s in self.scales if s[:-cut] + "weight" not in self.files)


def fp8_covers(path: str | Path, config: ModelConfig) -> bool:
    """Whether every checkpoint weight that fills one of the engine's FP8 parameters (FP8_PARAMS)
    is FP8 with a scale: then those parameters can stay FP8. A checkpoint that left some of
    them unquantized, or stores experts stacked, loads dequantized instead."""
    quant = config.quantization
    if quant is None:
        return False
    files = checkpoint_files(Path(path))
    matchers = [(_compile(rule.hf), rule) for rule in weight_rules(config)]
    for name in files:
        match = _match(matchers, name)
        if match is None or not match[0].param.endswith(FP8_PARAMS):
            continue
        scale_name = quant.scale_name(name)
        if match[0].stacked_experts or scale_name is None or scale_name not in files:
            return False
    return True


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile(regex + "$")


def _match(matchers, name):
    for regex, rule in matchers:
        m = regex.match(name)
        if m:
            return rule, m.groupdict()
    return None


def _copy(dest: torch.Tensor, src: torch.Tensor, rule: Rule, name: str) -> None:
    if rule.part_rows:
        dest = dest.narrow(0, sum(rule.part_rows[: rule.part]), rule.part_rows[rule.part])
    if tuple(src.shape) != tuple(dest.shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}")
    dest.copy_(src)


def _missing(params, filled, matchers, num_local: int, expert_ids: list[int]) -> list[str]:
    """Checkpoint names that would have filled what is still empty."""
    missing = []
    for target in params:
        if target.endswith("_scale") and target[: -len("_scale")] in params:
            continue  # an FP8 weight's scales: filled with the weight
        layer = re.match(r"layers\.(\d+)\.", target)
        layer_id = layer.group(1) if layer else None
        rules = [r for _, r in matchers if r.param.format(L=layer_id) == target]
        if not rules:
            if target == "lm_head.weight":  # tied to the embedding
                continue
            missing.append(f"(no rule fills {target})")
            continue
        done = filled.get(target, set())
        if any(r.per_expert for r in rules):
            per_expert = [r for r in rules if r.per_expert]
            for slot in range(num_local):
                if (slot, "whole") in done:  # filled from a stacked all-experts tensor
                    continue
                for rule in per_expert:
                    if (slot, rule.part) not in done:
                        missing.append(rule.hf.format(L=layer_id, E=expert_ids[slot]))
        else:
            for rule in rules:
                if (None, rule.part) not in done:
                    missing.append(rule.hf.format(L=layer_id))
    return missing


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights generated on the model's device (no checkpoint): normal(0, std) for
    matrices, 1 + small noise for norm weights, so the shapes and the work are real."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, param in params.items():
        if param.dim() == 1 and "norm" in name:
            param.normal_(1.0, 0.01, generator=generator)
        elif param.dtype == FP8_DTYPE:  # N(0, std) in FP8: values up to 8 std map to 448
            values = torch.empty(param.shape, device=param.device).normal_(0.0, FP8_MAX / 8, generator=generator)
            param.copy_(values.clamp_(-FP8_MAX, FP8_MAX))
            params[name + "_scale"].fill_(8 * std / FP8_MAX)
        elif not name.endswith("_scale") or params.get(name[: -len("_scale")]) is None:
            param.normal_(0.0, std, generator=generator)
