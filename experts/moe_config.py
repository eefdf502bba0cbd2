"""Launch configurations of the fused-MoE kernels: JSON data files, else a heuristic.

Plain Python (no Triton): the CPU path may import it. One data file per expert shape, dtype and
device, written by `python -m expertmesh.bench.moe_layer --sweep` and committed beside this module:

    experts/configs/E=128,F=1536,D=4096,dtype=bfloat16,device=NVIDIA_H200.json

    {"gemv_max_copies": 64,
     "gemv":    {"8":   {"first": {...}, "second": {...}}, "64": {...}},
     "blocked": {"512": {"BLOCK_M": 16, "first": {...}, "second": {...}}, ...}}

Keys of "gemv" and "blocked" are token-copy counts N = T*K (the rows of the grouped GEMM; for the
expert-parallel path, the rows received). A call with N copies takes the GEMV path when
N <= gemv_max_copies, and within the path the bucket whose key is nearest to N in log scale.
"first" is the gate/up GEMM (output 2F, reduction D), "second" the down GEMM (output D, reduction
F); each holds BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages and, for the blocked GEMMs,
tma (`KernelConfig`; a file without it means false). BLOCK_M is
per bucket because both GEMMs read the same alignment of copies to blocks.

The heuristic (no file for this shape and device) follows what the memory and compute bounds ask
for on an H100/H200-class GPU: GEMV up to 64 copies (each weight slice read once per copy, no
alignment kernels); then BLOCK_M as small as the copies per expert allow, so that one M-block
covers an expert's rows and its weights are read once per layer (16 rows for up to 16 copies per
expert, 64 up to 128), and 128x128 (x2: gate and up) / 128x256 tiles with 8 warps once the layer
is compute-bound.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")
GEMV_MAX_COPIES = 64
"""Heuristic GEMV/blocked threshold in token copies (T*K): decode batches up to 8 tokens at top-8."""


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel. The GEMV kernels ignore GROUP_M."""

    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False
    """Blocked GEMMs only: the persistent kernels that read weight tiles (and the down GEMM's
    activation tiles) through the tensor memory accelerator, where the launch allows it (16-bit
    weights without scales, tiles dividing the shape, a device with TMA or the interpreter);
    elsewhere the same launch takes the pointer kernels."""


@dataclass(frozen=True)
class MoeConfig:
    """The two expert GEMMs of one call. block_m None: the GEMV path (no alignment step)."""

    first: KernelConfig
    second: KernelConfig
    block_m: int | None = None

    @property
    def gemv(self) -> bool:
        return self.block_m is None

    def to_json(self) -> dict:
        out = {"first": asdict(self.first), "second": asdict(self.second)}
        if self.block_m is not None:
            out = {"BLOCK_M": self.block_m, **out}
        return out

    @classmethod
    def from_json(cls, data: dict, *, gemv: bool) -> MoeConfig:
        block_m = None if gemv else int(data["BLOCK_M"])
        return cls(KernelConfig(**data["first"]), KernelConfig(**data["second"]), block_m)


@dataclass(frozen=True)
class ConfigTable:
    """One data file: buckets keyed by token-copy count, as sorted (copies, config) pairs."""

    gemv_max_copies: int
    gemv: tuple[tuple[int, MoeConfig], ...] = field(default=())
    blocked: tuple[tuple[int, MoeConfig], ...] = field(default=())

    def pick(self, num_copies: int, E: int, F: int, D: int) -> MoeConfig:
        gemv = num_copies <= self.gemv_max_copies
        buckets = self.gemv if gemv else self.blocked
        if not buckets:
            return heuristic_config(num_copies, E, F, D, gemv=gemv)
        return min(buckets, key=lambda kv: abs(math.log(kv[0]) - math.log(max(num_copies, 1))))[1]

    def to_json(self) -> dict:
        return {"gemv_max_copies": self.gemv_max_copies,
                "gemv": {str(n): c.to_json() for n, c in self.gemv},
                "blocked": {str(n): c.to_json() for n, c in self.blocked}}

    @classmethod
    def from_json(cls, data: dict) -> ConfigTable:
        def buckets(section: str, gemv: bool):
            items = data.get(section, {})
            return tuple(sorted((int(n), MoeConfig.from_json(c, gemv=gemv)) for n, c in items.items()))
        return cls(int(data.get("gemv_max_copies", GEMV_MAX_COPIES)), buckets("gemv", True), buckets("blocked", False))


def config_file_name(E: int, F: int, D: int, dtype_name: str, device_name: str) -> str:
    """E local experts, F expert FFN width, D hidden; dtype as torch names it ("bfloat16")."""
    device = "_".join(device_name.replace("/", "_").split())
    return f"E={E},F={F},D={D},dtype={dtype_name},device={device}.json"


@functools.cache
def load_table(E: int, F: int, D: int, dtype_name: str, device_name: str,
               directory: str | None = None) -> ConfigTable | None:
    """The data file for this shape and device, or None where there is none (heuristic)."""
    path = Path(directory or CONFIG_DIR) / config_file_name(E, F, D, dtype_name, device_name)
    if not path.is_file():
        return None
    return ConfigTable.from_json(json.loads(path.read_text()))


def heuristic_config(num_copies: int, E: int, F: int, D: int, *, gemv: bool | None = None) -> MoeConfig:
    """Starting points for an H100/H200-class GPU; the sweep's data files replace them."""
    if gemv if gemv is not None else num_copies <= GEMV_MAX_COPIES:
        return MoeConfig(KernelConfig(16, 256, num_warps=4, num_stages=2),
                         KernelConfig(16, 128, num_warps=4, num_stages=2))
    per_expert = num_copies / max(E, 1)
    if per_expert <= 16:
        return MoeConfig(KernelConfig(64, 128, 1, 4, 4), KernelConfig(64, 128, 1, 4, 4), block_m=16)
    if per_expert <= 128:
        return MoeConfig(KernelConfig(64, 64, 8, 4, 4), KernelConfig(128, 64, 8, 4, 4), block_m=64)
    return MoeConfig(KernelConfig(128, 64, 8, 8, 3, tma=True), KernelConfig(256, 64, 8, 8, 3, tma=True), block_m=128)


def select_config(num_copies: int, E: int, F: int, D: int, dtype_name: str, device_name: str,
                  table: ConfigTable | None = None) -> MoeConfig:
    """The configuration for one call: the given table, else the data file, else the heuristic."""
    table = table or load_table(E, F, D, dtype_name, device_name)
    if table is None:
        return heuristic_config(num_copies, E, F, D)
    return table.pick(num_copies, E, F, D)
