"""Expert-load counters: tokens routed to each expert of each MoE layer, kept on the device.

Recording is one `index_add_` per layer (`record`, the plain path and the reference) or, on the
fused path, integer atomics inside the top-k kernel into `layer_counts(layer)` (with
`copy_weights_N` as the weights); neither synchronises with the host. `snapshot()` copies the
counts out when someone (metrics, the load balancer) asks.
"""
from __future__ import annotations

import torch


class ExpertLoadStats:
    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device | str = "cpu") -> None:
        self.counts_LE = torch.zeros(num_moe_layers, num_experts, dtype=torch.int64, device=device)
        self._ones = torch.ones(256, dtype=torch.int64, device=device)
        self.copy_weights_N: torch.Tensor | None = None
        """Set by the model runner around a CUDA graph's forward: int64 per routed copy (t*K + k),
        1 for copies of real rows and 0 for the padding rows of the graph's batch."""

    def record(self, moe_layer: int, topk_ids_TK: torch.Tensor) -> None:
        ids = topk_ids_TK.reshape(-1)
        if self.copy_weights_N is not None:
            self.counts_LE[moe_layer].index_add_(0, ids, self.copy_weights_N)
            return
        if self._ones.numel() < ids.numel():
            self._ones = torch.ones(2 * ids.numel(), dtype=torch.int64, device=ids.device)
        self.counts_LE[moe_layer].index_add_(0, ids, self._ones[: ids.numel()])

    def layer_counts(self, moe_layer: int) -> torch.Tensor:
        """int64 [num_experts], a view of the layer's row: the top-k kernel adds to it in place."""
        return self.counts_LE[moe_layer]

    def snapshot(self) -> torch.Tensor:
        """[num_moe_layers, num_experts] int64 on the CPU: tokens routed since the last reset."""
        return self.counts_LE.cpu()

    def reset(self) -> None:
        self.counts_LE.zero_()

    def imbalance(self) -> torch.Tensor:
        """Per layer: max over mean tokens per expert (1.0 is perfect balance; 0 when idle)."""
        counts = self.counts_LE.float()
        mean = counts.mean(dim=1)
        return torch.where(mean > 0, counts.max(dim=1).values / mean.clamp(min=1e-9), 0.0).cpu()
