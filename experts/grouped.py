"""The experts of one rank: stacked SiLU-gated FFN weights and the GEMM paths that run them.

Legend: N token copies routed to this rank, sorted by local expert; E local experts;
D hidden; F expert FFN width.

    w13_EFD = [E, 2F, D]   gate rows [0:F], up rows [F:2F]  (x @ w13[e].T -> [gate | up])
    w2_EDF  = [E, D, F]    down projection

Every path takes tokens already sorted by expert with per-expert counts (`counts_E`, which sum
to N) and returns the outputs in the same order:

- "reference": a Python loop over experts; the oracle the others are tested against.
- "grouped":   `torch._grouped_mm` with the counts' prefix sums as group offsets (one kernel
               for all experts; Hopper bf16 on CUDA, float32 on recent CPU builds).
- "batched":   tokens scattered into a padded [E, C, D] block (C = the largest count) and
               two `bmm`s; no per-expert loop, for devices without grouped GEMM.

The path is chosen once, at construction: "auto" takes "grouped" where a probe shows
grouped_mm runs for the weights' device, dtype and strides, and "batched" otherwise.

`dense(x_TD, weights_TE)` is the other way round: every token through every expert, weighted
by its routing weights (zero for experts it was not routed to), in one GEMM, one activation and
one bmm; no sort, no dispatch, no per-expert group. It does E/top_k times the work, so the
block uses it only while that work is tiny (see `SparseMoeBlock`): there the step is bound by
the number of ops, and the grouped path's per-expert groups cost more than the extra FLOPs.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

EXPERT_IMPLS = ("auto", "grouped", "batched", "reference")


class Experts(nn.Module):
    def __init__(
        self,
        num_local_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"unknown expert impl {impl!r}; choose one of {', '.join(EXPERT_IMPLS)}")
        self.num_local_experts = num_local_experts
        self.intermediate_size = intermediate_size
        # Built inside `torch.device("meta")` (CausalLM, which materializes every parameter once
        # afterwards): no storage now; the grouped_mm probe still asks the real device.
        building_on_meta = torch.get_default_device().type == "meta"
        factory = dict(device="meta" if building_on_meta else device, dtype=dtype)
        self.w13_EFD = nn.Parameter(torch.empty(num_local_experts, 2 * intermediate_size, hidden_size, **factory),
                                    requires_grad=False)
        self.w2_EDF = nn.Parameter(torch.empty(num_local_experts, hidden_size, intermediate_size, **factory),
                                   requires_grad=False)
        self.impl = impl if impl != "auto" else (
            "grouped" if _grouped_mm_works(self.w13_EFD, None if device is None else torch.device(device))
            else "batched")
        self._forward = {"grouped": self._grouped, "batched": self._batched, "reference": self._reference}[self.impl]

    _fp8_blocks: tuple[tuple[int, int], tuple[int, int]] | None = None

    @property
    def scales(self):
        """ExpertScales when the weights are FP8 (`to_fp8`), else None; only the fused Triton
        kernels read them. Built from the current parameters (materializing replaces them)."""
        if self._fp8_blocks is None:
            return None
        from expertmesh.experts.triton_fp8 import ExpertScales

        return ExpertScales(self.w13_EFD_scale, self.w2_EDF_scale, *self._fp8_blocks)

    def to_fp8(self, block13: tuple[int, int], block2: tuple[int, int]) -> None:
        """Replace the (empty) weights by FP8 ones and their float32 block scales, to be loaded:
        `w13_EFD_scale` [E, ceil(2F/b), ceil(D/b')] and `w2_EDF_scale` [E, ceil(D/b), ceil(F/b')]."""
        from expertmesh.model.quantization import FP8_DTYPE

        E, F2, D = self.w13_EFD.shape
        F = F2 // 2
        if F % block13[0]:
            raise ValueError(f"FP8 blocks of {block13[0]} rows straddle the experts' gate and up ({F} rows each)")
        device = self.w13_EFD.device

        def param(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.w13_EFD, self.w2_EDF = param(E, F2, D, dtype=FP8_DTYPE), param(E, D, F, dtype=FP8_DTYPE)
        self.w13_EFD_scale = param(E, -(-F2 // block13[0]), -(-D // block13[1]), dtype=torch.float32)
        self.w2_EDF_scale = param(E, -(-D // block2[0]), -(-F // block2[1]), dtype=torch.float32)
        self._fp8_blocks = (block13, block2)
        self.impl = "fp8"  # the fused kernels only: no torch path multiplies FP8 weights
        self._forward = self._fp8_unfused

    def _fp8_unfused(self, *args, **kwargs):
        raise RuntimeError("FP8 experts run only in the fused Triton kernels (router/fused_moe.py)")

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, expert_N: torch.Tensor | None = None) -> torch.Tensor:
        """x_ND sorted by local expert, counts_E (int64) per local expert, optionally expert_N (the
        local expert of each row, if the caller has it) -> y_ND in the same order."""
        if x_ND.shape[0] == 0:
            return x_ND.new_empty(0, self.w2_EDF.shape[1])
        return self._forward(x_ND, counts_E, expert_N)

    def dense(self, x_TD: torch.Tensor, weights_TE: torch.Tensor) -> torch.Tensor:
        """sum_e weights_TE[t, e] * expert_e(x_TD[t]) for every token, through all local experts."""
        E, F2, D = self.w13_EFD.shape
        T = x_TD.shape[0]
        h_TE2F = (x_TD @ self.w13_EFD.view(E * F2, D).T).view(T, E, F2)
        a_TEF = self._act(h_TE2F) * weights_TE.to(x_TD.dtype)[:, :, None]
        return torch.bmm(a_TEF.transpose(0, 1), self.w2_EDF.transpose(1, 2)).sum(0)

    def _act(self, h_N2F: torch.Tensor) -> torch.Tensor:
        gate, up = h_N2F.split(self.intermediate_size, dim=-1)
        return F.silu(gate) * up

    def _reference(self, x_ND: torch.Tensor, counts_E: torch.Tensor, expert_N=None) -> torch.Tensor:
        outputs, begin = [], 0
        for e, count in enumerate(counts_E.tolist()):
            x = x_ND[begin: begin + count]
            outputs.append(self._act(x @ self.w13_EFD[e].T) @ self.w2_EDF[e].T)
            begin += count
        return torch.cat(outputs)

    def _grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor, expert_N=None) -> torch.Tensor:
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        h_N2F = torch._grouped_mm(x_ND, self.w13_EFD.transpose(-2, -1), offs=offsets_E)
        return torch._grouped_mm(self._act(h_N2F), self.w2_EDF.transpose(-2, -1), offs=offsets_E)

    def _batched(self, x_ND: torch.Tensor, counts_E: torch.Tensor, expert_N: torch.Tensor | None) -> torch.Tensor:
        N, D = x_ND.shape
        E = self.num_local_experts
        if expert_N is None:
            expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=N)
        capacity = int(counts_E.max())
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        row_N = expert_N * capacity + (torch.arange(N, device=x_ND.device) - starts_E[expert_N])
        x_ECD = x_ND.new_zeros(E * capacity, D).index_copy_(0, row_N, x_ND).view(E, capacity, D)
        h_EC2F = torch.bmm(x_ECD, self.w13_EFD.transpose(1, 2))
        y_ECD = torch.bmm(self._act(h_EC2F), self.w2_EDF.transpose(1, 2))
        return y_ECD.view(E * capacity, D)[row_N]


def _grouped_mm_works(w13_EFD: torch.Tensor, device: torch.device | None = None) -> bool:
    """Whether torch._grouped_mm runs for these weights' dtype and strides on `device` (by default
    theirs; a meta tensor needs the device it will be materialized on)."""
    device = device or w13_EFD.device
    if not hasattr(torch, "_grouped_mm") or device.type == "meta":
        return False
    _, F2, D = w13_EFD.shape
    return _probe_grouped_mm(str(device), w13_EFD.dtype, F2, D)


@functools.cache
def _probe_grouped_mm(device: str, dtype: torch.dtype, F2: int, D: int) -> bool:
    """Both GEMMs of an expert with two experts' worth of weights: support depends on the device,
    the dtype and the row strides (D and F), not on the number of experts, so every layer of a
    model shares one small probe instead of allocating a full copy of its experts."""
    try:
        offsets = torch.tensor([2, 4], device=device, dtype=torch.int32)
        x = torch.zeros(4, D, device=device, dtype=dtype)
        w13 = torch.zeros(2, F2, D, device=device, dtype=dtype)
        w2 = torch.zeros(2, D, F2 // 2, device=device, dtype=dtype)
        h = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offsets)
        torch._grouped_mm(h[:, : F2 // 2].contiguous(), w2.transpose(-2, -1), offs=offsets)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False
