"""Sweep of the fused-MoE launch configurations on this GPU, written in the data-file format.

For each token bucket (T tokens, N = T*K copies, routing from random logits), every candidate
kernel runs alone, replayed from a CUDA graph (medians of CUDA-event timed replays). A timed call
cycles through several routings where one would leave its experts in the L2 (a few tokens at the
30B shape): the sweep then measures what a decode step pays, weights read from HBM.

  GEMV     (N <= 128):  each candidate of the first kernel, then of the second
  blocked  (all N):     for each BLOCK_M suited to the copies per expert, the alignment, each
                        candidate of each GEMM, and the combine (sum over K)

The bucket keeps the faster path's best configs; the GEMV/blocked threshold is the largest N up
to which GEMV wins every bucket measured. The candidate sets are small (4 to 6 per kernel and
BLOCK_M) and share their compile-time constants across buckets and shapes, so each compiles once:
compiles dominate the run. A wall-clock deadline ends the sweep early (later buckets keep the
heuristic) so that the benchmark always finishes.
"""
from __future__ import annotations

import time

import torch

from expertmesh.bench.gpu_timing import graph_time
from expertmesh.experts.moe_config import GEMV_MAX_COPIES, ConfigTable, KernelConfig, MoeConfig

GEMV_PROBE_MAX_COPIES = 128


def _k(n: int, k: int, group_m: int, warps: int, stages: int, tma: bool = False) -> KernelConfig:
    return KernelConfig(n, k, group_m, warps, stages, tma)


GEMV_FIRST = [_k(16, 256, 1, 4, 2), _k(8, 512, 1, 4, 2), _k(32, 256, 1, 4, 2), _k(16, 512, 1, 8, 2),
              _k(8, 256, 1, 4, 2), _k(32, 128, 1, 4, 2)]
GEMV_SECOND = [_k(16, 128, 1, 4, 2), _k(8, 128, 1, 4, 2), _k(8, 256, 1, 8, 2), _k(4, 256, 1, 4, 2),
               _k(16, 128, 1, 8, 2), _k(32, 64, 1, 8, 2)]
GEMM_FIRST = {
    16: [_k(64, 128, 1, 4, 4), _k(32, 128, 1, 4, 4), _k(128, 64, 1, 4, 4), _k(64, 64, 1, 4, 5),
         _k(32, 256, 1, 4, 3), _k(128, 128, 1, 8, 3)],
    32: [_k(64, 128, 4, 4, 4), _k(128, 64, 4, 4, 4), _k(64, 64, 4, 4, 4), _k(128, 128, 4, 8, 3)],
    64: [_k(64, 64, 8, 4, 4), _k(128, 64, 8, 4, 3), _k(64, 128, 8, 4, 3), _k(128, 64, 8, 8, 4),
         _k(128, 64, 8, 4, 4, True), _k(128, 64, 8, 8, 3, True)],
    128: [_k(128, 64, 8, 8, 3), _k(128, 64, 8, 8, 4), _k(64, 64, 8, 4, 4), _k(64, 128, 8, 8, 3),
          _k(128, 32, 8, 8, 4), _k(128, 64, 8, 8, 3, True), _k(128, 64, 8, 8, 4, True)],
}
GEMM_SECOND = {
    16: [_k(64, 128, 1, 4, 4), _k(128, 64, 1, 4, 4), _k(64, 256, 1, 4, 3), _k(128, 128, 1, 4, 3),
         _k(32, 256, 1, 4, 4), _k(256, 64, 1, 8, 3)],
    32: [_k(128, 64, 4, 4, 4), _k(64, 128, 4, 4, 4), _k(128, 128, 4, 4, 3), _k(256, 64, 4, 8, 3)],
    64: [_k(128, 64, 8, 4, 4), _k(64, 128, 8, 4, 4), _k(256, 64, 8, 8, 3), _k(128, 128, 8, 8, 3),
         _k(256, 64, 8, 8, 3, True), _k(128, 64, 8, 4, 4, True)],
    128: [_k(256, 64, 8, 8, 3), _k(128, 64, 8, 8, 4), _k(128, 128, 8, 8, 3), _k(256, 32, 8, 8, 4),
          _k(128, 64, 8, 4, 4), _k(256, 64, 8, 8, 3, True), _k(128, 64, 8, 8, 4, True)],
}
"""Candidates with tma=True are the persistent TMA kernels (16-bit weights; the FP8 sweep drops
the flag: its kernels read through pointers)."""


def _candidates(configs: list[KernelConfig], fp8: bool) -> list[KernelConfig]:
    """FP8 weights: the bf16 candidates with K tiles of 128 (one e4m3 tile row is 128 bytes, a
    Qwen scale block wide; the kernels cut wider tiles to it) and one more pipeline stage (the
    tiles take half the shared memory), without repeats."""
    if not fp8:
        return configs
    out: list[KernelConfig] = []
    for c in configs:
        for cand in (KernelConfig(c.BLOCK_N, 128, c.GROUP_M, c.num_warps, c.num_stages),
                     KernelConfig(c.BLOCK_N, 128, c.GROUP_M, c.num_warps, c.num_stages + 1)):
            if cand not in out:
                out.append(cand)
    return out


def block_ms(copies_per_expert: float) -> list[int]:
    """BLOCK_M values worth timing: small while one block holds an expert's copies."""
    if copies_per_expert <= 8:
        return [16]
    if copies_per_expert <= 32:
        return [16, 32]
    if copies_per_expert <= 128:
        return [16, 32, 64, 128]
    if copies_per_expert <= 512:
        return [64, 128]
    return [64, 128]


def _best(candidates, make, log, timer) -> tuple[float, KernelConfig] | None:
    best = None
    for config in candidates:
        fn = make(config)
        try:
            fn()  # compile outside the capture
            seconds = timer(fn)
        except Exception as e:  # a candidate this GPU cannot run is skipped, not fatal
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            log(f"    skip {config}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        if best is None or seconds < best[0]:
            best = (seconds, config)
    return best


def routings_past_l2(w13_EFD: torch.Tensor, top_k: int, T: int, l2_bytes: int) -> int:
    """How many routings a timed call cycles through so that the expert weights it reads add up
    to twice the L2 cache: one routing of a few tokens touches a few experts, which a replayed
    graph would otherwise find in the L2 every time (the 30B shape's 8 experts take 38 MB in FP8,
    75 in bf16, against the H200's 50 MB), where a real decode step reads them from HBM."""
    E, F2, D = w13_EFD.shape
    touched = E * (1 - (1 - top_k / E) ** T)
    per_call = touched * 3 * (F2 // 2) * D * w13_EFD.element_size()
    return max(1, min(MAX_ROUTINGS, -(-2 * l2_bytes // max(int(per_call), 1))))


MAX_ROUTINGS = 16


def sweep(w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, top_k: int, tokens: list[int], deadline: float,
          log=print, timer=graph_time, scales=None, l2_bytes: int | None = None) -> tuple[ConfigTable, list[dict]]:
    """Best configs per bucket for these weights; returns the table and one record per bucket.
    `timer(fn)` -> seconds per call of fn (fn has run once). FP8 weights come with their
    ExpertScales (the table is then the float8_e4m3fn data file's; the K tiles are fitted to the
    scale blocks as the kernels fit them, and the blocked GEMMs run W8A8). Each timed call cycles
    through enough routings to read its experts from memory, not from an L2 of `l2_bytes` (the
    device's by default; 0 off CUDA: one routing)."""
    if l2_bytes is None:
        l2_bytes = (torch.cuda.get_device_properties(w13_EFD.device).L2_cache_size
                    if w13_EFD.device.type == "cuda" else 0)
    records = []
    for T in tokens:  # in the caller's order: the buckets that matter most first, should time run out
        if time.monotonic() > deadline:
            log(f"  sweep T={T}: skipped (time budget spent); the heuristic stays")
            records.append({"tokens": T, "copies": T * top_k, "skipped": True})
            continue
        routings = routings_past_l2(w13_EFD, top_k, T, l2_bytes) if l2_bytes else 1
        records.append(_sweep_bucket(w13_EFD, w2_EDF, top_k, T, log, timer, scales, routings))
    return _table(records), records


def _cycled(calls: list) -> object:
    """One callable that makes each call of `calls` in turn (one per routing)."""
    def run() -> None:
        for call in calls:
            call()
    return run


def _sweep_bucket(w13_EFD, w2_EDF, K: int, T: int, log, timer, scales=None, routings: int = 1) -> dict:
    from expertmesh.experts.triton_moe import gemv_down, gemv_gate_up
    from expertmesh.router.triton_gating import topk_softmax_triton

    E, F2, D = w13_EFD.shape
    F, N, device = F2 // 2, T * K, w13_EFD.device
    dtype = torch.bfloat16 if scales is not None else w13_EFD.dtype
    x = torch.randn(T, D, device=device, dtype=dtype)
    routes = []
    for _ in range(routings):
        weights, ids = topk_softmax_triton(torch.randn(T, E, device=device), K, True, "topk_softmax")
        routes.append((ids.reshape(-1), weights.reshape(-1)))
    out = torch.empty(T, D, device=device, dtype=dtype)
    per_call = (lambda fn: timer(fn) / routings) if routings > 1 else timer
    record: dict = {"tokens": T, "copies": N, "routings": routings}
    if N <= GEMV_PROBE_MAX_COPIES:
        acts = [torch.zeros(N, F, device=device, dtype=dtype) for _ in routes]
        first = _best(GEMV_FIRST, lambda c: _cycled([
            lambda ids=ids, act=act: gemv_gate_up(x, w13_EFD, ids, act, top_k=K, config=c, scales=scales)
            for (ids, _), act in zip(routes, acts)]), log, per_call)
        second = _best(GEMV_SECOND, lambda c: _cycled([
            lambda ids=ids, w=w, act=act: gemv_down(act, w2_EDF, ids, out, top_k=K, config=c, weights_N=w,
                                                    scales=scales)
            for (ids, w), act in zip(routes, acts)]), log, per_call)
        if first and second:
            record["gemv_us"] = (first[0] + second[0]) * 1e6
            record["gemv"] = MoeConfig(first[1], second[1]).to_json()
            log(f"  sweep T={T}: GEMV {record['gemv_us']:.1f} us ({record['gemv']})")
    for bm in block_ms(N / E):
        blocked = _sweep_blocked(x, w13_EFD, w2_EDF, routes, out, K, bm, log, per_call, scales)
        if blocked and ("blocked_us" not in record or blocked[0] < record["blocked_us"]):
            record["blocked_us"], record["blocked"] = blocked
    return record


def _sweep_blocked(x, w13_EFD, w2_EDF, routes, out, K: int, bm: int, log, timer, scales=None):
    """(microseconds, config json) of the blocked path with BLOCK_M = bm and its best GEMM configs;
    `routes`: (ids_N, weights_N) of each routing a timed call cycles through."""
    from expertmesh.experts.triton_moe import gemm_down, gemm_gate_up
    from expertmesh.experts.triton_persistent import combine_copies
    from expertmesh.router.triton_align import align_blocks

    (T, D), E, F, N = x.shape, w13_EFD.shape[0], w2_EDF.shape[2], routes[0][0].numel()
    blocks = [align_blocks(ids, E, bm) for ids, _ in routes]
    align_s = timer(_cycled([lambda ids=ids: align_blocks(ids, E, bm) for ids, _ in routes]))
    acts = [torch.zeros(b.sorted_ids_M.shape[0], F, device=x.device, dtype=x.dtype) for b in blocks]
    y = torch.empty(N, D, device=x.device, dtype=x.dtype)
    fp8 = scales is not None
    first = _best(_candidates(GEMM_FIRST[bm], fp8), lambda c: _cycled([
        lambda b=b, act=act: gemm_gate_up(x, w13_EFD, act, b.sorted_ids_M, b.block_bucket_B, b.num_padded,
                                          num_copies=N, top_k=K, block_m=bm, config=c, scales=scales)
        for b, act in zip(blocks, acts)]), log, timer)
    second = _best(_candidates(GEMM_SECOND[bm], fp8), lambda c: _cycled([
        lambda b=b, act=act, w=w: gemm_down(act, w2_EDF, y, b.sorted_ids_M, b.block_bucket_B, b.num_padded,
                                            num_copies=N, block_m=bm, config=c, weights_N=w, scales=scales)
        for b, act, (_, w) in zip(blocks, acts, routes)]), log, timer)
    sum_s = timer(_cycled([lambda: combine_copies(y, out, K)] * len(routes)))
    if not (first and second):
        return None
    total = align_s + first[0] + second[0] + sum_s
    log(f"  sweep T={T} BLOCK_M={bm}: align {align_s * 1e6:.1f} + gate/up {first[0] * 1e6:.1f} + down "
        f"{second[0] * 1e6:.1f} + sum {sum_s * 1e6:.1f} = {total * 1e6:.1f} us")
    return total * 1e6, MoeConfig(first[1], second[1], bm).to_json()


def _table(records: list[dict]) -> ConfigTable:
    measured = sorted((r for r in records if not r.get("skipped")), key=lambda r: r["copies"])
    both = [r for r in measured if "gemv_us" in r and "blocked_us" in r]
    threshold = GEMV_MAX_COPIES if not both else 0
    for r in both:
        if r["gemv_us"] > r["blocked_us"]:
            break
        threshold = r["copies"]
    gemv = tuple((r["copies"], MoeConfig.from_json(r["gemv"], gemv=True))
                 for r in measured if "gemv" in r and r["copies"] <= max(threshold, 1))
    blocked = tuple((r["copies"], MoeConfig.from_json(r["blocked"], gemv=False)) for r in measured if "blocked" in r)
    return ConfigTable(threshold, gemv, blocked)
