"""Which experts each kind of work goes to: the engine's own expert-load counters per task family.

    expertmesh experts-report [--model DIR] [--out DIR] [--per-family N]

Each task family's held-out prompts (`demo/corpus.py`) run through the in-process engine, greedy,
one family after another; the engine's expert-load counters (`EngineCore.expert_load()`, tokens
routed to each expert of each MoE layer, the same counters /metrics shows) are read before and
after, and the difference is that family's load. Prefix caching is off, so a family's shared
system prompt is routed for every prompt and no family's numbers depend on which ran first.

Writes into `--out`: `experts_layer{L}.png`, a heatmap per MoE layer (task family x expert, the
share of that family's routed tokens), `experts.png` with every layer side by side, `experts.md`
(the shares as tables, and how far each family's routing is from the mix of all of them) and
`experts.json` (the raw counts).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from expertmesh.demo.corpus import FAMILIES, make_example, render

FAMILY_LABELS = {"arith_think": "arithmetic (thinking)", "arith_direct": "arithmetic (direct)",
                 "tool_call": "tool call", "tool_answer": "answer from tool", "json": "JSON extraction",
                 "phrasebook": "phrasebook", "python": "Python", "fewshot": "few-shot", "chat": "small talk"}


def family_loads(llm, per_family: int, seed: int = 11, max_tokens: int = 160) -> dict[str, torch.Tensor]:
    """{family: int64 [MoE layers, experts] tokens routed while its prompts ran}."""
    from expertmesh import SamplingParams

    rng = random.Random(f"experts:{seed}")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    loads = {}
    for family in FAMILIES:
        prompts = [render(llm.tokenizer, make_example(rng, family, "test"))[0] for _ in range(per_family)]
        before = llm.engine.expert_load().clone()
        llm.generate(prompts, params)
        loads[family] = llm.engine.expert_load() - before
    return loads


def shares(loads: dict[str, torch.Tensor]) -> torch.Tensor:
    """float [families, layers, experts]: each family's share of routed tokens per layer (rows sum to 1)."""
    counts = torch.stack([loads[f] for f in loads]).double()
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def distances(share_FLE: torch.Tensor) -> torch.Tensor:
    """[families, layers]: total variation distance between a family's routing and the mean of all
    families' (0: routed like everyone else; 1: experts nobody else uses)."""
    mix_LE = share_FLE.mean(0, keepdim=True)
    return 0.5 * (share_FLE - mix_LE).abs().sum(-1)


def markdown(families: list[str], share_FLE: torch.Tensor) -> str:
    _, L, E = share_FLE.shape
    tv = distances(share_FLE)
    lines = ["# Expert load per task family", "",
             "Share of each family's routed tokens (prompt and generated) that went to each expert, per "
             "MoE layer; top-k slots count once each. Uniform routing would be "
             f"{100 / E:.1f}% everywhere.", "",
             "## Distance from the mix of all families (total variation, 0 to 1)", "",
             "| family | " + " | ".join(f"layer {i}" for i in range(L)) + " |",
             "| --- |" + " --- |" * L]
    for f, name in enumerate(families):
        lines.append(f"| {FAMILY_LABELS[name]} | " + " | ".join(f"{tv[f, i]:.2f}" for i in range(L)) + " |")
    for layer in range(L):
        lines += ["", f"## Layer {layer}", "", "| family | " + " | ".join(f"e{e}" for e in range(E)) + " |",
                  "| --- |" + " ---: |" * E]
        for f, name in enumerate(families):
            row = share_FLE[f, layer]
            top = int(row.argmax())
            cells = [f"**{100 * v:.0f}%**" if e == top else f"{100 * v:.0f}%" for e, v in enumerate(row.tolist())]
            lines.append(f"| {FAMILY_LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _heatmap(ax, share_FE, families: list[str], title: str, labels: bool):
    image = ax.imshow(100 * share_FE.numpy(), cmap="viridis", vmin=0, vmax=max(50.0, float(100 * share_FE.max())))
    E = share_FE.shape[1]
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    if labels:  # (the panels share their y axis: setting empty labels on one would blank them all)
        ax.set_yticks(range(len(families)), [FAMILY_LABELS[f] for f in families])
    ax.set_xlabel("expert")
    ax.set_title(title)
    for f in range(len(families)):
        for e in range(E):
            value = 100 * float(share_FE[f, e])
            ax.text(e, f, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 30 else "white")
    return image


def plots(families: list[str], share_FLE: torch.Tensor, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    F, L, E = share_FLE.shape
    written = []
    for layer in range(L):
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * E + 1.8, 0.45 * F + 1.4))
        image = _heatmap(ax, share_FLE[:, layer], families, f"MoE layer {layer}: % of each family's routed tokens",
                         True)
        fig.colorbar(image, ax=ax, shrink=0.8)
        fig.tight_layout()
        path = out / f"experts_layer{layer}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, L, figsize=(2.2 + 0.42 * E * L, 0.42 * F + 1.6), sharey=True)
    for layer, ax in enumerate(axes if L > 1 else [axes]):
        _heatmap(ax, share_FLE[:, layer], families, f"layer {layer}", layer == 0)
    fig.suptitle("Share of each task family's routed tokens per expert (%), demo model")
    fig.tight_layout()
    fig.savefig(out / "experts.png", dpi=110)
    plt.close(fig)
    return [*written, out / "experts.png"]


def report(model: str | None = None, out: str | Path = "experts_report", per_family: int = 16,
           device: str = "cpu", seed: int = 11) -> dict[str, Path]:
    """Run the families, write the files; returns {"markdown", "json", "png", "layers": [...]}."""
    from expertmesh import LLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model, device=device, enable_prefix_caching=False, progress=False)
    try:
        if llm.engine.expert_load() is None:
            raise ValueError("the model has no MoE layers, so no expert load to report")
        loads = family_loads(llm, per_family, seed)
    finally:
        llm.shutdown()
    families = list(loads)
    share_FLE = shares(loads)
    (out / "experts.json").write_text(json.dumps(
        {"families": families, "tokens_per_layer_expert": {f: loads[f].tolist() for f in families}}, indent=1) + "\n")
    (out / "experts.md").write_text(markdown(families, share_FLE))
    pngs = plots(families, share_FLE, out)
    return {"markdown": out / "experts.md", "json": out / "experts.json", "png": out / "experts.png",
            "layers": pngs[:-1]}


def main(args: argparse.Namespace) -> int:
    written = report(args.model, args.out, args.per_family, args.device, args.seed)
    print(written["markdown"].read_text())
    print(f"wrote {written['png']}, {len(written['layers'])} per-layer heatmaps, {written['markdown']}, "
          f"{written['json']}")
    return 0
