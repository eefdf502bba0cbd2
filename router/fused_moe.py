"""The fused MoE of one GPU: routed copies through the Triton expert kernels and back, no host sync.

Legend: T tokens, K experts per token, N = T*K token copies, E local experts, D hidden, F expert
FFN width, G global experts.

`fused_moe` is the local dispatcher, the experts and the combine in a few kernels (the reference
is `LocalDispatcher` + `Experts._reference`: tests hold the two equal):

    N <= gemv_max_copies (decode):   gemv_gate_up -> gemv_down (weighted sum over K fused)
                                     2 kernels; no sort, no alignment, no empty programs
    otherwise:                       align_blocks (3 small kernels) -> gemm_gate_up (SiLU-and-mul
                                     fused) -> gemm_down (routing weights applied) -> combine
                                     (sum over K); at large N the two GEMMs are persistent
                                     kernels that read tiles through TMA (config `tma`)

`grouped_experts` is the experts alone for the all-to-all dispatcher: rows arrive sorted by local
expert, padding rows (expert >= E) come out as zeros, and the dispatcher's combine applies the
routing weights.

The launch configurations come from experts/moe_config.py (data files, else a heuristic). Every
size is a Python int of the call (T, K, E, D, F), so a CUDA graph captured for a batch size
replays for any routing. Imports Triton: load this module only where CUDA is (or under
TRITON_INTERPRET=1 in tests).
"""
from __future__ import annotations

import functools

import torch

from expertmesh.experts.moe_config import ConfigTable, MoeConfig, load_table, select_config
from expertmesh.experts.triton_fp8 import ExpertScales, check_scales
from expertmesh.experts.triton_moe import (
    check_operands,
    gemm_down,
    gemm_gate_up,
    gemv_down,
    gemv_gate_up,
)
from expertmesh.experts.triton_persistent import combine_copies
from expertmesh.router.triton_align import align_blocks


@functools.cache
def device_name(device: torch.device) -> str:
    """The name configs are keyed by: torch's CUDA device name ("NVIDIA H200"), else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def moe_config(num_copies: int, w13_EFD: torch.Tensor, table: ConfigTable | None = None) -> MoeConfig:
    """The launch configuration a call with `num_copies` copies over these weights uses."""
    E, F2, D = w13_EFD.shape
    dtype_name = str(w13_EFD.dtype).removeprefix("torch.")
    if table is None and w13_EFD.dtype == torch.float8_e4m3fn:  # FP8 weights, bf16 tiles until swept in FP8
        device = device_name(w13_EFD.device)
        table = load_table(E, F2 // 2, D, dtype_name, device) or load_table(E, F2 // 2, D, "bfloat16", device)
    return select_config(num_copies, E, F2 // 2, D, dtype_name, device_name(w13_EFD.device), table)


def fused_moe(x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
              w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, *, expert_to_local_E: torch.Tensor | None = None,
              out: torch.Tensor | None = None, config: MoeConfig | None = None,
              scales: ExpertScales | None = None) -> torch.Tensor:
    """out_TD[t] = sum_k topk_weights_TK[t, k] * expert_{topk_ids_TK[t, k]}(x_TD[t]), in x's dtype.

    topk_ids_TK: int32/int64 expert ids; global ids when `expert_to_local_E` (int [G], -1 for
    experts not on this rank) maps them to local weight slots; copies of experts not on this rank
    add nothing. topk_weights_TK: any float dtype (used in float32). `out`: a [T, D] buffer of x's
    dtype to write into (a CUDA graph's); every element is written. `config`: force a launch
    configuration (tests, the sweep); by default the data file's or the heuristic's for N = T*K.
    `scales`: the FP8 weights' block scales (w13_EFD and w2_EDF are then float8 e4m3).
    """
    T, D = x_TD.shape
    K = topk_ids_TK.shape[1]
    E, F2, _ = w13_EFD.shape
    F, N = F2 // 2, T * K
    if topk_ids_TK.shape != (T, K) or topk_weights_TK.shape != (T, K):
        raise ValueError(f"topk ids {tuple(topk_ids_TK.shape)} and weights {tuple(topk_weights_TK.shape)} "
                         f"must both be [{T}, K]")
    x_TD = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    if out is None:
        out = torch.empty_like(x_TD)
    check_operands(x_TD, w13_EFD, w2_EDF, out)
    check_scales(w13_EFD, w2_EDF, scales)
    if N == 0:
        return out
    config = config or moe_config(N, w13_EFD)
    ids_N = topk_ids_TK.reshape(-1)
    weights_N = topk_weights_TK.reshape(-1)
    if weights_N.dtype != torch.float32:
        weights_N = weights_N.float()
    if config.gemv:
        act_NF = x_TD.new_empty(N, F)
        gemv_gate_up(x_TD, w13_EFD, ids_N, act_NF, top_k=K, config=config.first, expert_to_local_E=expert_to_local_E,
                     scales=scales)
        gemv_down(act_NF, w2_EDF, ids_N, out, top_k=K, config=config.second, weights_N=weights_N,
                  expert_to_local_E=expert_to_local_E, scales=scales)
        return out
    blocks = align_blocks(ids_N, E, config.block_m, expert_to_local_E)
    act_MF = x_TD.new_empty(blocks.sorted_ids_M.shape[0], F)
    gemm_gate_up(x_TD, w13_EFD, act_MF, blocks.sorted_ids_M, blocks.block_bucket_B, blocks.num_padded,
                 num_copies=N, top_k=K, block_m=config.block_m, config=config.first, scales=scales)
    y_ND = x_TD.new_empty(N, D)
    gemm_down(act_MF, w2_EDF, y_ND, blocks.sorted_ids_M, blocks.block_bucket_B, blocks.num_padded,
              num_copies=N, block_m=config.block_m, config=config.second, weights_N=weights_N, scales=scales)
    return combine_copies(y_ND, out, K)


def grouped_experts(x_ND: torch.Tensor, expert_N: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, *,
                    out: torch.Tensor | None = None, config: MoeConfig | None = None,
                    scales: ExpertScales | None = None) -> torch.Tensor:
    """y_ND[n] = expert_{expert_N[n]}(x_ND[n]) for rows sorted by local expert (expert_N int,
    non-decreasing); rows with expert_N >= E (padding of the fixed-capacity all-to-all) give zeros.
    No routing weight: the dispatcher's combine applies it."""
    N = x_ND.shape[0]
    E, F2, _ = w13_EFD.shape
    F = F2 // 2
    if expert_N.shape != (N,):
        raise ValueError(f"expert_N must be [{N}], got {tuple(expert_N.shape)}")
    x_ND = x_ND if x_ND.stride(-1) == 1 else x_ND.contiguous()
    if out is None:
        out = torch.empty_like(x_ND)
    check_operands(x_ND, w13_EFD, w2_EDF, out)
    check_scales(w13_EFD, w2_EDF, scales)
    if N == 0:
        return out
    config = config or moe_config(N, w13_EFD)
    if config.gemv:
        act_NF = x_ND.new_empty(N, F)
        gemv_gate_up(x_ND, w13_EFD, expert_N, act_NF, top_k=1, config=config.first, scales=scales)
        gemv_down(act_NF, w2_EDF, expert_N, out, top_k=1, config=config.second, scales=scales)
        return out
    blocks = align_blocks(expert_N, E, config.block_m)
    act_MF = x_ND.new_empty(blocks.sorted_ids_M.shape[0], F)
    gemm_gate_up(x_ND, w13_EFD, act_MF, blocks.sorted_ids_M, blocks.block_bucket_B, blocks.num_padded,
                 num_copies=N, top_k=1, block_m=config.block_m, config=config.first, scales=scales)
    gemm_down(act_MF, w2_EDF, out, blocks.sorted_ids_M, blocks.block_bucket_B, blocks.num_padded,
              num_copies=N, block_m=config.block_m, config=config.second, scales=scales)
    return out

