"""A quick greedy check of a model being trained, in plain torch (no engine, no server).

It re-runs the training forward over the whole sequence for every new token (no KV cache): slow
in principle, quick at the demo's size on a GPU, and it needs nothing beyond torch, so it runs
where the training runs. The real evaluation goes through the served API (`demo/evaluate.py`).
"""
from __future__ import annotations

import json
import random

import torch

from expertmesh.demo.corpus import FAMILIES, make_example, render
from expertmesh.demo.scoring import is_correct, parse_completion
from expertmesh.model.training import training_forward


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new: int, device: str) -> list[list[int]]:
    """Greedy continuations of `prompts` (token ids), each up to `<|im_end|>` or `max_new` tokens."""
    stop = set(tokenizer.eos_token_ids)
    pad = tokenizer.token_to_id("<|endoftext|>")
    lengths = [len(p) for p in prompts]
    S = max(lengths) + max_new
    ids = torch.full((len(prompts), S), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    live = set(range(len(prompts)))
    rows = torch.arange(len(prompts), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    for _ in range(max_new):
        if not live:
            break
        width = max(lengths[i] for i in live)
        with autocast:
            hidden, _ = training_forward(model, ids[:, :width])
            last = torch.tensor(lengths, device=device).clamp(max=width) - 1
            next_ids = model.lm_head(hidden[rows, last]).argmax(-1).tolist()
        for i in list(live):
            token = next_ids[i]
            out[i].append(token)
            ids[i, lengths[i]] = token
            lengths[i] += 1
            if token in stop or len(out[i]) >= max_new:
                live.discard(i)
    return out


def quick_eval(model, tokenizer, per_family: int, device: str, seed: int = 1, max_new: int = 160) -> dict[str, float]:
    """Held-out accuracy per family from greedy decoding; prints a table and a few samples."""
    model.eval()
    rng = random.Random(f"quick:{seed}")
    results = {}
    for family in FAMILIES:
        batch = [make_example(rng, family, "test") for _ in range(per_family)]
        prompts = [tokenizer.encode(render(tokenizer, ex)[0]) for ex in batch]
        outputs = greedy(model, tokenizer, prompts, max_new, device)
        right = 0
        for n, (ex, out) in enumerate(zip(batch, outputs)):
            content, reasoning, calls = parse_completion(tokenizer.decode(out, skip_special_tokens=False))
            ok = is_correct(ex, content, reasoning, [c if isinstance(c.get("arguments"), dict) else {} for c in calls])
            right += ok
            if n < 2:
                print(f"[{family}] {'ok ' if ok else 'BAD'} {ex.messages[-1]['content'][-70:]!r} -> "
                      f"{json.dumps(content, ensure_ascii=False)[:80]} {json.dumps(calls)[:100]}")
        results[family] = right / len(batch)
    print("\n| family | held-out accuracy |\n| --- | --- |")
    for family, acc in results.items():
        print(f"| {family} | {acc:.0%} |")
    model.train()
    return results
