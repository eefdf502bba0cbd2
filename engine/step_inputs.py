"""A step's inputs on the device without a host sync, in buffers that never move (CUDA graphs
read them in place).

Legend: T tokens of the step, B sequences, M block-table width, S block size.

    chunks + request tokens ──host (numpy)──▶ pinned staging buffer ──one non-blocking copy──▶
        device buffer, sliced into fields at fixed offsets:
            input_ids_T, positions_T, slot_mapping_T, query_start_B1, seq_lens_B, logits_rows,
            valid_T (1 for real rows, 0 for a graph's padding rows)
    block tables ──[B, M_step] packed in their own pinned buffer, one copy, then one device-side
        copy──▶ block_table_BM [B max, M max] (a fixed row stride for the graphs)

Two staging buffers alternate: a step fills one while the copy of the step before may still be
queued behind the GPU's work; an event tells when a buffer's copy has run (it always has by the
time the buffer comes round again, so waiting on it costs nothing in practice).

Padding rows (a CUDA graph of a larger batch than the step's) take token 0 at position 0, write
their k/v into a scratch block of the cache that no sequence owns, attend to that one slot, and
have valid 0 (the expert-load counters ignore them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INT32 = np.int32


@dataclass(frozen=True)
class HostStep:
    """One step's inputs on the host (built by the runner from the plan's chunks)."""

    input_ids_T: np.ndarray
    positions_T: np.ndarray
    slot_mapping_T: np.ndarray
    query_start_B1: np.ndarray
    seq_lens_B: np.ndarray
    block_tables: list[np.ndarray]
    logits_rows: np.ndarray
    """Rows of the flat batch whose logits are computed (the last row of each sampling chunk)."""

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids_T)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_B)

    @property
    def decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs == len(self.logits_rows)


def host_step(starts: np.ndarray, num_tokens: np.ndarray, tokens: list[list[int]], block_tables: list[np.ndarray],
              sample: np.ndarray, block_size: int) -> HostStep:
    """Index arithmetic of a step in numpy: positions, KV slots, sequence offsets, logits rows."""
    B = len(num_tokens)
    query_start_B1 = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(num_tokens, out=query_start_B1[1:])
    T = int(query_start_B1[-1])
    seq_of_T = np.repeat(np.arange(B), num_tokens)
    positions_T = starts[seq_of_T] + (np.arange(T) - query_start_B1[:-1][seq_of_T])
    width = max((len(t) for t in block_tables), default=1)
    tables_BM = np.zeros((B, max(width, 1)), dtype=np.int64)
    for b, table in enumerate(block_tables):
        tables_BM[b, : len(table)] = table
    slot_mapping_T = tables_BM[seq_of_T, positions_T // block_size] * block_size + positions_T % block_size
    input_ids_T = np.fromiter((t for ids in tokens for t in ids), dtype=np.int64, count=T)
    return HostStep(input_ids_T, positions_T, slot_mapping_T, query_start_B1, starts + num_tokens,
                    block_tables, query_start_B1[1:][np.asarray(sample, dtype=bool)] - 1)


class StepInputs:
    """Persistent device buffers of the kernel path and the staging that fills them."""

    FIELDS = ("input_ids", "positions", "slot_mapping", "valid", "logits_rows", "query_start", "seq_lens")

    def __init__(self, device: torch.device, max_tokens: int, max_seqs: int, max_blocks_per_seq: int,
                 scratch_block: int, block_size: int) -> None:
        self.device = device
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks_per_seq
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        sizes = {"input_ids": max_tokens, "positions": max_tokens, "slot_mapping": max_tokens, "valid": max_tokens,
                 "logits_rows": max_seqs, "query_start": max_seqs + 1, "seq_lens": max_seqs}
        self.offsets: dict[str, tuple[int, int]] = {}
        end = 0
        for name, n in sizes.items():
            self.offsets[name] = (end, n)
            end += (n + 31) // 32 * 32  # 128-byte aligned fields
        pin = device.type == "cuda"
        self._host = [torch.zeros(end, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._host_tables = [torch.zeros(max_seqs * max_blocks_per_seq, dtype=torch.int32, pin_memory=pin)
                             for _ in range(2)]
        self._packed_tables = torch.zeros(max_seqs * max_blocks_per_seq, dtype=torch.int32, device=device)
        self._copied = [None, None]
        self._turn = 0
        self.buffer = torch.zeros(end, dtype=torch.int32, device=device)
        self.block_table_BM = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)

    def field(self, name: str, n: int | None = None) -> torch.Tensor:
        """A device view of field `name` (its first n entries; all of it by default)."""
        start, size = self.offsets[name]
        return self.buffer[start: start + (size if n is None else n)]

    def upload(self, step: HostStep, pad_seqs_to: int | None = None) -> None:
        """Write the step into the next staging buffer and copy it to the device (non-blocking).
        With `pad_seqs_to`, a decode-only step is padded with scratch rows to that many sequences."""
        B, T = step.num_seqs, step.num_tokens
        rows = pad_seqs_to or B
        if self.max_tokens < T or rows > self.max_seqs:
            raise ValueError(f"a step of {T} tokens in {B} sequences exceeds the buffers "
                             f"({self.max_tokens} tokens, {self.max_seqs} sequences)")
        turn = self._turn = 1 - self._turn
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # that buffer's last copy (two steps ago) has long run
        host, tables = self._host[turn].numpy(), self._host_tables[turn].numpy()
        pad = rows - B

        def put(name: str, values: np.ndarray, fill: int | None = None) -> None:
            start, _ = self.offsets[name]
            n = len(values)
            host[start: start + n] = values
            if fill is not None and pad:
                host[start + n: start + n + pad] = fill

        put("input_ids", step.input_ids_T, 0)
        put("positions", step.positions_T, 0)
        put("slot_mapping", step.slot_mapping_T, self.scratch_slot)
        start, _ = self.offsets["valid"]
        host[start: start + T] = 1
        host[start + T: start + T + pad] = 0
        put("logits_rows", step.logits_rows)
        if pad:
            start, _ = self.offsets["logits_rows"]
            host[start + len(step.logits_rows): start + len(step.logits_rows) + pad] = np.arange(T, T + pad)
        put("query_start", step.query_start_B1)
        if pad:
            start, _ = self.offsets["query_start"]
            host[start + B + 1: start + rows + 1] = np.arange(T + 1, T + pad + 1)
        put("seq_lens", step.seq_lens_B, 1)
        width = max((len(t) for t in step.block_tables), default=1)
        if width > self.max_blocks:
            raise ValueError(f"a block table of {width} blocks exceeds the buffers ({self.max_blocks})")
        packed = tables[: rows * width].reshape(rows, width)
        for b, table in enumerate(step.block_tables):
            packed[b, : len(table)] = table
        packed[B:rows, 0] = self.scratch_block
        self.buffer.copy_(self._host[turn], non_blocking=True)
        self._packed_tables[: rows * width].copy_(self._host_tables[turn][: rows * width], non_blocking=True)
        self.block_table_BM[:rows, :width].copy_(self._packed_tables[: rows * width].view(rows, width))
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._copied[turn] = event
