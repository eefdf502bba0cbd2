"""Train the demo model: a plain PyTorch loop over the project's own Qwen3-MoE (`CausalLM`).

    python -m expertmesh.demo.train --out DIR [--steps N] [--device cuda] [--time-budget S]
        [--init CHECKPOINT] [--mix tool_call=30,fewshot=25]

Data: an endless stream of corpus examples (`demo/corpus.py`), rendered with the project's chat
template and tokenized with the demo tokenizer in DataLoader workers; batches hold examples of
similar length, right-padded. Loss: cross-entropy on the assistant's tokens only (the completion
up to `<|im_end|>`), plus `router_aux_loss_coef` x the router's load-balancing loss
(`model.training.load_balancing_loss`, Qwen3-MoE's). AdamW, linear warm-up then cosine decay over
the run's progress, which is the larger of steps done / `--steps` and time spent / `--time-budget`
(so a run on a budget still ends its schedule); bf16 autocast on CUDA. `--init` starts from a
checkpoint's weights instead of fresh ones (training continued over several device calls, or tuned
on a different family mix, `--mix`), with a fresh optimizer and schedule.

Output: a `qwen3_moe` checkpoint in Hugging Face's layout (config.json, bf16 weights in two
safetensors files with their index, the tokenizer files), which transformers loads as
Qwen3MoeForCausalLM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from expertmesh.demo.corpus import TRAINING_FAMILIES, examples, parse_mix, render
from expertmesh.demo.tokenizer import TOKENIZER_DIR
from expertmesh.model.config import ModelConfig
from expertmesh.model.decoder import CausalLM
from expertmesh.model.loader import load_weights
from expertmesh.model.tiny import _write_weights
from expertmesh.model.tokenizer import Tokenizer
from expertmesh.model.training import load_balancing_loss, training_forward

SHAPE = {"num_hidden_layers": 6, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 64, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 256}
"""The shipped model's shape (DESIGN.md, the demo section, says why)."""
ROUTER_AUX_LOSS_COEF = 0.01
IGNORE = -100


def hf_config(tokenizer: Tokenizer, shape: dict) -> dict:
    """config.json of a qwen3_moe checkpoint of `shape` over `tokenizer`."""
    vocab = -(-tokenizer.vocab_size // 64) * 64
    pad, eos = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab,
        **shape, "intermediate_size": 4 * shape["hidden_size"], "hidden_act": "silu",
        "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "attention_dropout": 0.0, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": shape["num_hidden_layers"], "bos_token_id": pad,
        "eos_token_id": eos, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "output_router_logits": False, "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF,
    }


def build_model(config: dict, device: str, seed: int) -> CausalLM:
    """A CausalLM on the plain-torch paths with fresh weights: N(0, 0.02) matrices (the output
    projections scaled down by sqrt(2L)), norms at 1."""
    model = CausalLM(ModelConfig.from_hf_dict(config), kernels="torch", expert_impl="reference", device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    depth_scale = 1 / math.sqrt(2 * config["num_hidden_layers"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "w2_EDF")) else 1.0)
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            p.requires_grad_(True)
    return model


# -- data -----------------------------------------------------------------------------------------

def encode_example(tokenizer: Tokenizer, example) -> tuple[list[int], int]:
    """(token ids of prompt + completion, prompt length): each part tokenized on its own, as the
    server tokenizes the prompt and the model then adds its tokens."""
    prompt, completion = render(tokenizer, example)
    p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
    return p + c, len(p)


def collate(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, S] right-padded, labels [B, S]: the next token where it is the assistant's, else IGNORE)."""
    S = max(len(ids) for ids, _ in rows)
    ids_BS = torch.full((len(rows), S), pad_id, dtype=torch.long)
    labels_BS = torch.full((len(rows), S), IGNORE, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        ids_BS[i, : len(ids)] = torch.tensor(ids)
        labels_BS[i, prompt_len - 1: len(ids) - 1] = torch.tensor(ids[prompt_len:])
    return ids_BS, labels_BS


class Batches(IterableDataset):
    """Endless batches of at most `batch_tokens` padded tokens; each worker its own example stream."""

    def __init__(self, tokenizer_dir: str, batch_tokens: int, seed: int, pool: int = 4096,
                 mix: dict[str, float] | None = None) -> None:
        self.tokenizer_dir, self.batch_tokens, self.seed, self.pool = tokenizer_dir, batch_tokens, seed, pool
        self.mix = mix

    def __iter__(self):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
        info = get_worker_info()
        worker = info.id if info is not None else 0
        tokenizer = Tokenizer.from_pretrained(self.tokenizer_dir)
        pad_id = tokenizer.token_to_id("<|endoftext|>")
        rng = random.Random(f"batches:{self.seed}:{worker}")
        round_ = 0
        while True:
            stream = examples(self.pool, "train", seed=self.seed * 100_003 + worker * 1_009 + round_,
                              families=TRAINING_FAMILIES, mix=self.mix)
            rows = sorted((encode_example(tokenizer, ex) for ex in stream), key=lambda r: len(r[0]))
            batches, current = [], []
            for row in rows:
                if current and (len(current) + 1) * len(row[0]) > self.batch_tokens:
                    batches.append(current)
                    current = []
                current.append(row)
            rng.shuffle(batches)  # the last, partial batch of the longest rows is dropped
            for batch in batches:
                yield collate(batch, pad_id)
            round_ += 1


# -- export ---------------------------------------------------------------------------------------

def hf_tensors(model: CausalLM, dtype: torch.dtype = torch.bfloat16) -> OrderedDict[str, torch.Tensor]:
    """Our parameters under the Hub's qwen3_moe names (the loader's rules, backwards)."""
    c = model.config
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    out["model.embed_tokens.weight"] = model.embed_tokens.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        q, k, v = layer.attn.qkv_proj.weight.split((c.q_size, c.kv_size, c.kv_size))
        out.update({f"{p}.input_layernorm.weight": layer.input_layernorm.weight,
                    f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.k_proj.weight": k,
                    f"{p}.self_attn.v_proj.weight": v, f"{p}.self_attn.o_proj.weight": layer.attn.o_proj.weight,
                    f"{p}.self_attn.q_norm.weight": layer.attn.q_norm.weight,
                    f"{p}.self_attn.k_norm.weight": layer.attn.k_norm.weight,
                    f"{p}.post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
                    f"{p}.mlp.gate.weight": layer.mlp.gate.weight})
        experts = layer.mlp.experts
        for e in range(c.num_experts):
            gate, up = experts.w13_EFD[e].split(c.moe_intermediate_size)
            out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = gate
            out[f"{p}.mlp.experts.{e}.up_proj.weight"] = up
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = experts.w2_EDF[e]
    out["model.norm.weight"] = model.norm.weight
    out["lm_head.weight"] = model.lm_head.weight
    return OrderedDict((k, t.detach().to("cpu", dtype).contiguous()) for k, t in out.items())


def save_checkpoint(model: CausalLM, config: dict, tokenizer_dir: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(out, hf_tensors(model), num_shards=2)  # two files of ~12 MB: each well under 16 MiB
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    return out


# -- the loop -------------------------------------------------------------------------------------

def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(out: str | Path, *, steps: int = 4000, device: str = "cpu", time_budget: float | None = None,
          batch_tokens: int = 65536, lr: float = 2e-3, workers: int = 0, seed: int = 0, shape: dict | None = None,
          tokenizer_dir: str | Path = TOKENIZER_DIR, log_every: int = 50, progress: bool = True,
          init: str | Path | None = None, mix: dict[str, float] | None = None) -> dict:
    """Train, write the checkpoint into `out`, return {"losses": [...], "steps", "seconds", "model"}.
    `init`: a checkpoint to start from (its config and weights; `shape` is then ignored)."""
    torch.manual_seed(seed)
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    if init is None:
        config = hf_config(tokenizer, shape or SHAPE)
        model = build_model(config, device, seed)
    else:
        config = json.loads((Path(init) / "config.json").read_text(encoding="utf-8"))
        model = build_model(config, device, seed)
        with torch.no_grad():
            load_weights(model, init, model.config, progress=False)
    decay = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"))
    loader = DataLoader(Batches(str(tokenizer_dir), batch_tokens, seed, mix=mix), batch_size=None, num_workers=workers,
                        pin_memory=device.startswith("cuda"), prefetch_factor=8 if workers else None,
                        persistent_workers=bool(workers))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    top_k, losses, start = config["num_experts_per_tok"], [], time.monotonic()
    bar = tqdm(total=steps, desc="train", unit="step", disable=not progress)
    step, window, waited = 0, [], 0.0
    batches = iter(loader)
    while True:
        before = time.monotonic()
        ids_BS, labels_BS = next(batches)
        waited += time.monotonic() - before
        elapsed = time.monotonic() - start
        fraction = max(step / steps, elapsed / time_budget if time_budget else 0.0)
        if fraction >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(fraction, lr)
        ids_BS = ids_BS.to(device, non_blocking=True)
        labels_BS = labels_BS.to(device, non_blocking=True)
        with autocast:
            hidden_BSD, router_logits = training_forward(model, ids_BS)
            # every position's logits, the prompt's ignored: a boolean pick would sync with the host each step
            logits = model.lm_head(hidden_BSD).float()
            lm_loss = F.cross_entropy(logits.flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE)
            real_T = (ids_BS != tokenizer.token_to_id("<|endoftext|>")).flatten()
            aux = load_balancing_loss(router_logits, top_k, real_T)
            loss = lm_loss + ROUTER_AUX_LOSS_COEF * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append((lm_loss.detach(), aux.detach()))
        if step % log_every == 0 or step == 1:
            lm, ax = (torch.stack(x).mean().item() for x in zip(*window))
            losses.append(lm)
            window = []
            bar.set_postfix(loss=f"{lm:.3f}", aux=f"{ax:.3f}", lr=f"{lr_at(fraction, lr):.1e}",
                            data=f"{waited / max(elapsed, 1e-9):.0%}")
        bar.update(1)
    bar.close()
    if window:
        losses.append(torch.stack([w[0] for w in window]).mean().item())
    seconds = time.monotonic() - start
    save_checkpoint(model, config, tokenizer_dir, Path(out))
    return {"losses": losses, "steps": step, "seconds": seconds, "waited": waited, "model": model,
            "tokenizer": tokenizer}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m expertmesh.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the checkpoint into")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps (the schedule's length)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to train on (default: cuda when there is one)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of training: the schedule ends at whichever of steps and time comes first")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="padded tokens per batch")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers generating the corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the corpus stream")
    parser.add_argument("--eval", type=int, default=0,
                        help="after training, greedy-decode this many held-out prompts per family and print accuracy")
    parser.add_argument("--init", default=None, metavar="CHECKPOINT",
                        help="start from this checkpoint's weights (and config) instead of fresh ones")
    parser.add_argument("--mix", default="", metavar="FAMILY=SHARE,...",
                        help="family shares replacing the corpus's defaults, e.g. tool_call=30,fewshot=25")
    args = parser.parse_args(argv)
    try:
        mix = parse_mix(args.mix) if args.mix else None
    except ValueError as exc:
        parser.error(f"--mix {exc}")
    if args.init is not None and not (Path(args.init) / "config.json").is_file():
        parser.error(f"--init {args.init!r}: no config.json there")
    result = train(args.out, steps=args.steps, device=args.device, time_budget=args.time_budget,
                   batch_tokens=args.batch_tokens, lr=args.lr, workers=args.workers, seed=args.seed,
                   init=args.init, mix=mix)
    print(f"trained {result['steps']} steps in {result['seconds']:.0f} s ({result['waited']:.0f} s waiting for "
          f"data); loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}; wrote {args.out}")
    print("losses every 50 steps:", " ".join(f"{x:.3f}" for x in result["losses"]))
    if args.eval:
        from expertmesh.demo.quick_eval import quick_eval

        quick_eval(result["model"], result["tokenizer"], args.eval, args.device)


if __name__ == "__main__":
    main()
