"""The sparse MoE block: gate -> dispatch -> experts -> combine (+ Qwen2-MoE's shared expert).

The block knows no communication: its dispatcher is handed in (the local one for EP=1, the
all-to-all one under expert parallelism) and it only calls dispatch() and combine().

Two paths, chosen once at construction:
  - plain torch (the CPU path and the oracle): `gate()`, the dispatcher, `Experts` (grouped_mm,
    batched or the reference loop), the dispatcher's combine;
  - fused (`fast`, the CUDA kernel path; expert_impl "auto" or "triton"): the gate through
    `fast_linear` (the small-batch GEMV at decode), the Triton top-k (which also counts the
    expert load: no `stats.record` here), then with the local dispatcher `fused_moe` (no sort
    at decode; aligned blocks and two GEMMs with SiLU-and-mul and the routing weights fused
    otherwise), or under expert parallelism the dispatcher's all-to-all around
    `grouped_experts`. No host sync: CUDA graphs capture it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertmesh.experts import Experts
from expertmesh.model.config import ModelConfig
from expertmesh.model.layers import DenseMLP, fast_linear
from expertmesh.router import ExpertLoadStats, GateConfig, gate
from expertmesh.router.dispatch import LocalDispatcher

DENSE_MAX_MACS = 1 << 22
"""Largest dense expert work (multiply-adds per step) run through `Experts.dense`: about 4 M,
tens of microseconds on a CPU core; a Qwen3-30B-A3B token alone needs 600 M."""


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig, num_local_experts: int, moe_index: int, *,
                 dispatcher, stats: ExpertLoadStats | None, expert_impl: str = "auto", fast: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if expert_impl == "triton" and not fast:
            raise ValueError("expert_impl 'triton' is the CUDA kernel path's (kernels 'auto' on CUDA, or 'triton')")
        self.fused = fast and expert_impl in ("auto", "triton")
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(num_local_experts, config.hidden_size, config.moe_intermediate_size,
                               impl="auto" if self.fused else expert_impl, device=device, dtype=dtype)
        self.gate_config = GateConfig(
            top_k=config.top_k,
            renormalize=config.norm_topk_prob,
            # With renormalisation, softmax over the top-k logits equals softmax -> top-k -> renormalise
            # (test_mixtral_topk_then_softmax_equals_softmax_topk_renormalised) in two ops instead of four.
            scoring="topk_softmax" if config.norm_topk_prob else "softmax_topk",
        )
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size, fast=fast)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.moe_index = moe_index
        self.dispatcher = dispatcher
        self.stats = stats
        # Tokens up to which every token goes through every expert at once (Experts.dense): only
        # when all experts are local and the dense work stays below DENSE_MAX_MACS (toy and test
        # models; never a real checkpoint, whose experts are far too large).
        macs_per_token = num_local_experts * 3 * config.hidden_size * config.moe_intermediate_size
        self.all_to_all = hasattr(dispatcher, "begin_step")
        # (an all-to-all dispatcher may hold as many slots as there are experts: redundant copies)
        local = (isinstance(dispatcher, LocalDispatcher) and not self.all_to_all
                 and dispatcher.num_local_experts == config.num_experts)
        self.dense_max_tokens = (DENSE_MAX_MACS // macs_per_token
                                 if local and expert_impl == "auto" and not self.fused else 0)
        # The fused local path reads the placement table only when some expert is elsewhere.
        self._expert_map = None
        if self.fused and isinstance(dispatcher, LocalDispatcher) and not self.all_to_all:
            identity = torch.arange(config.num_experts, device=dispatcher.expert_to_local_E.device)
            if not torch.equal(dispatcher.expert_to_local_E, identity):
                self._expert_map = dispatcher.expert_to_local_E

    @property
    def capturable(self) -> bool:
        """No host sync inside (a CUDA graph can record it): the fused path, or grouped_mm."""
        return self.fused or self.experts.impl == "grouped"

    @property
    def stops_at_valid_rows(self) -> bool:
        """The experts skip the padding rows of a fixed-capacity all-to-all (grouped_mm stops at the
        last valid row; the fused kernels give padding rows zeros)."""
        return self.fused or self.experts.impl == "grouped"

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.fused:
            out_TD = self._fused(x_TD)
        else:
            out_TD = self._reference(x_TD)
        if self.shared_expert is not None:
            out_TD = out_TD + F.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        return out_TD

    def _fused(self, x_TD: torch.Tensor) -> torch.Tensor:
        from expertmesh.router import fused_moe, triton_gating

        g, stats = self.gate_config, self.stats
        # The expert-load counters are counted inside the top-k kernel (no index_add_ per layer).
        topk_weights_TK, topk_ids_TK = triton_gating.topk_softmax_triton(
            fast_linear(self.gate, x_TD), g.top_k, g.renormalize, g.scoring,
            counts_E=None if stats is None else stats.layer_counts(self.moe_index),
            copy_weights_N=None if stats is None else stats.copy_weights_N)
        w13, w2, scales = self.experts.w13_EFD, self.experts.w2_EDF, self.experts.scales
        if not self.all_to_all:
            return fused_moe.fused_moe(x_TD, topk_weights_TK, topk_ids_TK, w13, w2, expert_to_local_E=self._expert_map,
                                       scales=scales)
        routed = self.dispatcher.dispatch(x_TD, topk_ids_TK, topk_weights_TK, self.moe_index)
        y_ND = fused_moe.grouped_experts(routed.x_ND, routed.expert_N, w13, w2, scales=scales)
        return self.dispatcher.combine(y_ND, routed.handle)

    def _reference(self, x_TD: torch.Tensor) -> torch.Tensor:
        topk_weights_TK, topk_ids_TK = gate(self.gate(x_TD), self.gate_config)
        if self.stats is not None:
            self.stats.record(self.moe_index, topk_ids_TK)
        if 0 < x_TD.shape[0] <= self.dense_max_tokens:
            local_TK = self.dispatcher.expert_to_local_E[topk_ids_TK]
            weights_TE = topk_weights_TK.new_zeros(x_TD.shape[0], self.experts.num_local_experts)
            out_TD = self.experts.dense(x_TD, weights_TE.scatter_(1, local_TK, topk_weights_TK))
        else:
            routed = self.dispatcher.dispatch(x_TD, topk_ids_TK, topk_weights_TK, self.moe_index)
            y_ND = self.experts(routed.x_ND, routed.counts_E, routed.expert_N)
            out_TD = self.dispatcher.combine(y_ND, routed.handle)
        return out_TD
