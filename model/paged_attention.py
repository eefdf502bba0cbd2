"""Paged attention that reads the KV cache where it lies: the host plan, its device copy, and the
plain-torch reference the Triton kernel (model/triton_attention.py) is held to.

Legend: T query rows of the step (flat over its sequences), B sequences, H query heads, G KV heads,
QPK = H/G query heads per KV head, d head dim, N KV blocks, S block size, M block-table width,
I work items, J merge groups, R partial rows.

One step, on the GPU:
  1. `plan_attention` (numpy, on the host, once per step, shared by every layer) cuts the step into
     work items: a tile of a sequence's queries (BLOCK_Q queries x the QPK query heads of one KV head
     = BLOCK_M kernel rows) against a key range [kv0, kv1). Sequences with at most one tile of
     queries (decodes) form the "decode" kind; longer chunks the "prefill" kind (larger tiles).
     When a kind has too few tiles to fill the GPU, each tile's key range is split (split-KV) and
     the pieces write normalised partial outputs and their log-sum-exp to a workspace.
  2. `AttentionPlanBuffers.upload` copies the plan's int32 arrays to the device in one
     non-blocking copy from pinned memory.
  3. Per layer, `triton_attention.paged_attention` launches the attention kernel once per kind
     (grid: items x G programs, the plan's items ordered longest first); the last piece of a split
     tile to finish combines the pieces by log-sum-exp.

CUDA graphs: with `capacity=` the decode kind's arrays are padded to sizes that depend only on
(capacity, heads, SMs, window), the real counts live in a device array, and programs past the
real count exit at once; so one captured decode launch serves every step of that batch size.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ITEM_FIELDS = ("seq", "qoff", "nq", "kv0", "kv1", "prow", "grp")  # rows of WorkList.items_7I
GROUP_FIELDS = ("seq", "qoff", "nq", "prow0", "nsplit")  # rows of WorkList.groups_5J
SPLIT_GRANULE = 256  # split boundaries sit on multiples of this (a multiple of every BLOCK_N)
_ALIGN = 16  # int32 sections of the packed plan start on 64-byte boundaries


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _align(x: int) -> int:
    return -(-x // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class WorkList:
    """The work items of one kind (decode or prefill) and the merge groups of its split tiles.

    items_7I:   int32 [7, item_cap], rows ITEM_FIELDS: sequence b; first query of the tile as an
                offset into b's queries; number of queries (<= block_q); key range [kv0, kv1);
                first partial row in the workspace, or -1 when the item writes the output itself;
                its tile's merge group (a column of groups_5J), or -1.
                Columns past num_items are padding (zeros).
    groups_5J:  int32 [5, group_cap], rows GROUP_FIELDS: one per split tile, its pieces at partial
                rows prow0 + (split * G + kv_head) * block_m + row.
    block_m:    kernel rows of a tile (block_q queries x QPK heads, padded to a power of two).
    """

    items_7I: np.ndarray
    groups_5J: np.ndarray
    num_items: int
    num_groups: int
    block_m: int
    block_q: int

    @property
    def item_cap(self) -> int:
        return self.items_7I.shape[1]

    @property
    def group_cap(self) -> int:
        return self.groups_5J.shape[1]


@functools.lru_cache(maxsize=1024)
def _layout(dec_items: int, dec_groups: int, pre_items: int, pre_groups: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    sections = [("counts_4", (4,)), ("decode_items", (7, dec_items)), ("decode_groups", (5, dec_groups)),
                ("prefill_items", (7, pre_items)), ("prefill_groups", (5, pre_groups))]
    out, offset = {}, 0
    for name, shape in sections:
        out[name] = (offset, shape)
        offset += _align(math.prod(shape))
    return out


@dataclass(frozen=True)
class AttentionPlan:
    """Host plan of one step (see the module docstring). `partial_rows` sizes the workspace;
    `counts_4` = [decode items, prefill items, decode groups, prefill groups] (also in the packed
    copy, so a replayed graph reads the real counts)."""

    decode: WorkList
    prefill: WorkList
    counts_4: np.ndarray
    num_q_heads: int
    num_kv_heads: int
    partial_rows: int
    capacity: int | None

    @property
    def caps(self) -> tuple[int, int, int, int]:
        return self.decode.item_cap, self.decode.group_cap, self.prefill.item_cap, self.prefill.group_cap

    def layout(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """name -> (offset, shape) of each section of `packed()`. The decode sections come first
        and depend only on the capacity, so their device addresses stay put across steps."""
        return _layout(*self.caps)

    @property
    def packed_size(self) -> int:
        offset, shape = self.layout()["prefill_groups"]
        return offset + _align(math.prod(shape))

    def packed(self) -> np.ndarray:
        """Every array of the plan in one int32 buffer, laid out as `layout()` says."""
        flat = np.zeros(self.packed_size, dtype=np.int32)
        arrays = {"counts_4": self.counts_4, "decode_items": self.decode.items_7I,
                  "decode_groups": self.decode.groups_5J, "prefill_items": self.prefill.items_7I,
                  "prefill_groups": self.prefill.groups_5J}
        for name, (offset, shape) in self.layout().items():
            flat[offset: offset + math.prod(shape)] = arrays[name].reshape(-1)
        return flat


def attention_sms(device: torch.device) -> int:
    """The SMs a plan spreads its work over: the device's, or 4 off CUDA (Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def plan_attention(
    query_start_B1: np.ndarray, seq_lens_B: np.ndarray, *, num_q_heads: int, num_kv_heads: int, num_sms: int,
    capacity: int | None = None, sliding_window: int | None = None, prefill_block_m: int = 128,
    decode_waves: int = 4, min_split_keys: int = SPLIT_GRANULE, split_granule: int = SPLIT_GRANULE,
    key_limit_B: np.ndarray | None = None,
) -> AttentionPlan:
    """Work items of one step. query_start_B1: offsets of each sequence's queries in the flat batch
    (B+1); seq_lens_B: context length after this step (query i of b sits at position
    seq_lens_B[b] - q_len_b + i). capacity: pad the decode kind for a CUDA graph of at most this
    many sequences (ValueError if more). sliding_window: as the kernel gets it (key ranges start
    at the window). Split-KV aims at num_sms * decode_waves programs for decode tiles and num_sms
    for prefill tiles, never below min_split_keys keys a piece, the pieces starting on multiples
    of split_granule (keep it a multiple of the kernels' BLOCK_N: a piece then has no ragged tile
    but its last). key_limit_B: sequence b's keys end at key_limit_B[b] <= seq_lens_B[b], whatever
    its queries' positions (a query then sees keys [0, min(position + 1, limit))): a shard of a
    sequence-parallel sequence, whose later keys live on other ranks (model/sequence_parallel.py).
    A tile that sees no key still has one item (an empty range: output 0, LSE -inf)."""
    qs = np.asarray(query_start_B1, dtype=np.int64)
    sl = np.asarray(seq_lens_B, dtype=np.int64)
    if qs.ndim != 1 or sl.ndim != 1 or len(qs) != len(sl) + 1:
        raise ValueError(f"query_start_B1 needs B+1 entries for B={len(sl)} sequences, got {qs.shape}")
    q_len = np.diff(qs)
    if (q_len < 0).any() or (sl < q_len).any() or qs[0] != 0:
        raise ValueError("query_start_B1 must rise from 0 and every seq_len must cover its queries")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if min_split_keys < 1 or split_granule < 1:
        raise ValueError(f"min_split_keys ({min_split_keys}) and split_granule ({split_granule}) must be >= 1")
    limit = sl
    if key_limit_B is not None:
        limit = np.asarray(key_limit_B, dtype=np.int64)
        if limit.shape != sl.shape or (limit < 0).any() or (limit > sl).any():
            raise ValueError(f"key_limit_B needs one limit in [0, seq_len] for each of the {len(sl)} sequences")
        if sliding_window is not None:
            raise ValueError("key_limit_B and sliding_window do not combine")
    G, qpk = num_kv_heads, num_q_heads // num_kv_heads
    dec_bm = max(16, _next_pow2(qpk))
    pre_bm = max(_next_pow2(prefill_block_m), _next_pow2(qpk))
    dec_bq, pre_bq = dec_bm // qpk, pre_bm // qpk
    dec_seqs = np.flatnonzero((q_len >= 1) & (q_len <= dec_bq))
    pre_seqs = np.flatnonzero(q_len > dec_bq)
    if capacity is not None and len(dec_seqs) > capacity:
        raise ValueError(f"{len(dec_seqs)} decode sequences exceed the plan's capacity {capacity}")
    common = dict(q_len=q_len, seq_lens=sl, limits=limit, G=G, window=sliding_window, min_split=min_split_keys,
                  granule=split_granule)
    decode = _work_list(dec_seqs, block_q=dec_bq, block_m=dec_bm, target=num_sms * decode_waves, row_base=0,
                        capacity=capacity, **common)
    dec_rows = _partial_rows_cap(decode, capacity, num_sms * decode_waves, G, sliding_window)
    assert decode.num_groups == 0 or int(decode.items_7I[5].max()) + G * dec_bm <= dec_rows
    prefill = _work_list(pre_seqs, block_q=pre_bq, block_m=pre_bm, target=num_sms, row_base=dec_rows,
                         capacity=None, **common)
    pre_rows = int(prefill.groups_5J[4].sum()) * G * pre_bm
    counts = np.array([decode.num_items, prefill.num_items, decode.num_groups, prefill.num_groups], np.int32)
    return AttentionPlan(decode=decode, prefill=prefill, counts_4=counts, num_q_heads=num_q_heads,
                         num_kv_heads=G, partial_rows=dec_rows + pre_rows, capacity=capacity)


def _caps(capacity: int, target: int, G: int, window: int | None) -> tuple[int, int, int]:
    """Upper bounds (items, groups, split items) of a decode kind of at most `capacity` tiles.
    Pieces start on multiples of chunk >= total/T (T = ceil(target/G)): a tile of hi keys gives
    ceil(hi/chunk) <= hi/chunk + 1 pieces, so all pieces <= T + tiles, and a tile splits only when
    hi > chunk, so fewer than T tiles split. A window's range may straddle one more boundary."""
    T = -(-target // G)
    extra = capacity if window is not None else 0
    groups = capacity if window is not None else min(capacity, T)
    return capacity + T + extra, groups, T + groups * (2 if window is not None else 1)


def _partial_rows_cap(work: WorkList, capacity, target, G, window) -> int:
    if capacity is None:
        return int(work.groups_5J[4].sum()) * G * work.block_m
    return _caps(capacity, target, G, window)[2] * G * work.block_m


SMALL_WORK_TILES = 64
"""Up to this many tiles, a kind is planned in Python ints (`_work_list_small`): at batch 1 the
numpy arithmetic of `_work_list` is ~60 calls on arrays of one element, a few hundred µs a step
of host time in front of every decode graph's launch."""


def _work_list(seqs, *, q_len, seq_lens, limits, G, window, min_split, granule, block_q, block_m, target, row_base,
               capacity):
    """Tiles of `seqs`, split along the keys when there are fewer than `target` programs, ordered
    longest first (the GPU starts programs in order, so the long ones do not trail)."""
    args = dict(G=G, window=window, min_split=min_split, granule=granule, block_q=block_q, block_m=block_m,
                target=target, row_base=row_base, capacity=capacity)
    if len(seqs) <= SMALL_WORK_TILES and int(q_len[seqs].sum(initial=0)) <= SMALL_WORK_TILES * block_q:
        tiles = _tiles_small(seqs.tolist(), q_len.tolist(), seq_lens.tolist(), limits.tolist(), block_q, window)
        if len(tiles) <= SMALL_WORK_TILES:
            return _work_list_small(tiles, **args)
    return _work_list_numpy(seqs, q_len=q_len, seq_lens=seq_lens, limits=limits, **args)


def _tiles_small(seqs: list[int], q_len: list[int], seq_lens: list[int], limits: list[int], block_q: int,
                 window: int | None) -> list[tuple[int, int, int, int, int]]:
    """(sequence, first query, queries, first key, key end) of each tile of `seqs`."""
    tiles = []
    for b in seqs:
        for qoff in range(0, q_len[b], block_q):
            nq = min(block_q, q_len[b] - qoff)
            pos0 = seq_lens[b] - q_len[b] + qoff
            tiles.append((b, qoff, nq, max(0, pos0 - window + 1) if window is not None else 0,
                          min(pos0 + nq, limits[b])))
    return tiles


def _work_list_small(tiles, *, G, window, min_split, granule, block_q, block_m, target, row_base, capacity):
    """`_work_list_numpy`'s arithmetic in Python ints, for a few tiles (the same arrays, tested so)."""
    chunk = None
    if tiles and len(tiles) * G < target:
        T = -(-target // G)
        per = -(-sum(hi - lo for *_, lo, hi in tiles) // T)
        chunk = max(min_split, -(-per // granule) * granule)
    items, groups, prow0 = [], [], row_base
    for b, qoff, nq, lo, hi in tiles:
        if chunk is None:
            items.append((b, qoff, nq, lo, hi, -1, -1))
            continue
        first = lo // chunk
        nsplit = max(1, -(-hi // chunk) - first)  # an empty range (a key limit) is one empty item
        for piece in range(nsplit):
            kv0, kv1 = max(lo, (first + piece) * chunk), min(hi, (first + piece + 1) * chunk)
            split = nsplit > 1
            items.append((b, qoff, nq, kv0, kv1, prow0 + piece * G * block_m if split else -1,
                          len(groups) if split else -1))
        if nsplit > 1:
            groups.append((b, qoff, nq, prow0, nsplit))
            prow0 += nsplit * G * block_m
    items.sort(key=lambda item: item[3] - item[4])  # stable: longest key range first, ties in order
    num_items, num_groups = len(items), len(groups)
    item_cap, group_cap = num_items, num_groups
    if capacity is not None:
        item_cap, group_cap, _ = _caps(capacity, target, G, window)
        assert num_items <= item_cap and num_groups <= group_cap, (num_items, item_cap, num_groups, group_cap)
    items_7I = np.zeros((7, item_cap), dtype=np.int32)
    groups_5J = np.zeros((5, group_cap), dtype=np.int32)
    if items:
        items_7I[:, :num_items] = np.array(items, dtype=np.int32).T
    if groups:
        groups_5J[:, :num_groups] = np.array(groups, dtype=np.int32).T
    return WorkList(items_7I=items_7I, groups_5J=groups_5J, num_items=num_items, num_groups=num_groups,
                    block_m=block_m, block_q=block_q)


def _work_list_numpy(seqs, *, q_len, seq_lens, limits, G, window, min_split, granule, block_q, block_m, target,
                     row_base, capacity):
    """`_work_list` in numpy (the reference of `_work_list_small`, and the path of large steps)."""
    n_tiles_b = -(-q_len[seqs] // block_q)
    tile_seq = np.repeat(seqs, n_tiles_b)
    n_tiles = len(tile_seq)
    tile_first = np.repeat(np.cumsum(n_tiles_b) - n_tiles_b, n_tiles_b)
    qoff = (np.arange(n_tiles) - tile_first) * block_q
    nq = np.minimum(block_q, q_len[tile_seq] - qoff)
    pos0 = seq_lens[tile_seq] - q_len[tile_seq] + qoff
    hi = np.minimum(pos0 + nq, limits[tile_seq])
    lo = np.maximum(0, pos0 - window + 1) if window is not None else np.zeros_like(hi)
    if n_tiles == 0 or n_tiles * G >= target:
        chunk = None
        nsplit = np.ones(n_tiles, dtype=np.int64)
    else:
        T = -(-target // G)
        per = -(-int((hi - lo).sum()) // T)
        chunk = max(min_split, -(-per // granule) * granule)
        nsplit = np.maximum(1, -(-hi // chunk) - lo // chunk)  # an empty range (a key limit): one empty item
    item_tile = np.repeat(np.arange(n_tiles), nsplit)
    piece = np.arange(len(item_tile)) - np.repeat(np.cumsum(nsplit) - nsplit, nsplit)
    if chunk is None:
        kv0, kv1 = lo[item_tile], hi[item_tile]
    else:
        start = lo // chunk
        kv0 = np.maximum(lo[item_tile], (start[item_tile] + piece) * chunk)
        kv1 = np.minimum(hi[item_tile], (start[item_tile] + piece + 1) * chunk)
    split = nsplit > 1
    group_rows = np.where(split, nsplit * G * block_m, 0)
    prow0 = row_base + np.cumsum(group_rows) - group_rows
    prow = np.where(split[item_tile], prow0[item_tile] + piece * G * block_m, -1)
    grp = np.where(split[item_tile], (np.cumsum(split) - 1)[item_tile], -1)
    order = np.argsort(-(kv1 - kv0), kind="stable")
    items = np.stack([tile_seq[item_tile], qoff[item_tile], nq[item_tile], kv0, kv1, prow, grp])[:, order]
    groups = np.stack([tile_seq, qoff, nq, prow0, nsplit])[:, split]
    num_items, num_groups = items.shape[1], groups.shape[1]
    if capacity is not None:
        item_cap, group_cap, _ = _caps(capacity, target, G, window)
        assert num_items <= item_cap and num_groups <= group_cap, (num_items, item_cap, num_groups, group_cap)
        items = np.pad(items, ((0, 0), (0, item_cap - num_items)))
        groups = np.pad(groups, ((0, 0), (0, group_cap - num_groups)))
    return WorkList(items_7I=items.astype(np.int32), groups_5J=groups.astype(np.int32), num_items=num_items,
                    num_groups=num_groups, block_m=block_m, block_q=block_q)


@dataclass(frozen=True)
class AttentionPlanTensors:
    """An AttentionPlan on the device: int32 views into one buffer, beside the host plan (whose
    plain ints, caps and tile sizes, the launcher reads)."""

    plan: AttentionPlan
    counts_4: torch.Tensor
    decode_items: torch.Tensor
    decode_groups: torch.Tensor
    prefill_items: torch.Tensor
    prefill_groups: torch.Tensor

    @classmethod
    def view(cls, plan: AttentionPlan, buffer: torch.Tensor) -> AttentionPlanTensors:
        parts = {name: buffer[offset: offset + math.prod(shape)].view(shape)
                 for name, (offset, shape) in plan.layout().items()}
        return cls(plan=plan, **parts)


def plan_to_device(plan: AttentionPlan, device: torch.device | str) -> AttentionPlanTensors:
    """One-off copy (tests, benchmarks); the engine reuses an AttentionPlanBuffers."""
    return AttentionPlanTensors.view(plan, torch.from_numpy(plan.packed()).to(device))


class AttentionPlanBuffers:
    """A pinned host buffer and a device buffer of `size` int32s that every step's plan goes
    through: one non-blocking copy per step, and the same device addresses every step (a plan
    with the same capacity lays out the same way), which CUDA graph replays need. Size it for the
    largest plan (`plan_bounds`); a larger plan raises instead of moving the buffer under a graph."""

    def __init__(self, size: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        self.buffer = torch.zeros(size, dtype=torch.int32, device=self.device)
        self._copied = torch.cuda.Event() if pin else None
        self._host_np = self.host.numpy()
        self._views: dict[tuple[int, int, int, int], dict[str, torch.Tensor]] = {}  # by the plan's caps

    def upload(self, plan: AttentionPlan) -> AttentionPlanTensors:
        flat = plan.packed()
        if len(flat) > self.host.numel():
            raise ValueError(f"plan needs {len(flat)} int32s, the buffers hold {self.host.numel()}")
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the pinned buffer
        self._host_np[: len(flat)] = flat
        self.buffer[: len(flat)].copy_(self.host[: len(flat)], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        views = self._views.get(plan.caps)
        if views is None:  # a graph's batch size (or an eager step's shape) seen for the first time
            views = self._views[plan.caps] = {
                name: self.buffer[offset: offset + math.prod(shape)].view(shape)
                for name, (offset, shape) in plan.layout().items()}
        return AttentionPlanTensors(plan=plan, **views)


@dataclass(frozen=True)
class PlanBounds:
    """Sizes that hold every plan of an engine: the packed int32s (AttentionPlanBuffers) and the
    workspace's partial rows (triton_attention.AttentionWorkspace)."""

    packed_ints: int
    partial_rows: int


def plan_bounds(*, max_num_seqs: int, max_num_tokens: int, num_q_heads: int, num_kv_heads: int, num_sms: int,
                capacity: int | None = None, sliding_window: int | None = None, prefill_block_m: int = 128,
                decode_waves: int = 4) -> PlanBounds:
    """Upper bounds over steps of at most max_num_seqs sequences and max_num_tokens query rows,
    planned with these settings (capacity: the decode kind's, as for a CUDA graph)."""
    G, qpk = num_kv_heads, num_q_heads // num_kv_heads
    dec_bm = max(16, _next_pow2(qpk))
    pre_bm = max(_next_pow2(prefill_block_m), _next_pow2(qpk))
    t_dec, t_pre = -(-num_sms * decode_waves // G), -(-num_sms // G)
    if capacity is not None:
        dec_items, dec_groups, dec_pieces = _caps(capacity, num_sms * decode_waves, G, sliding_window)
    else:  # pieces <= T + 2 * tiles; split tiles <= tiles
        dec_items, dec_groups = t_dec + 2 * max_num_seqs, max_num_seqs
        dec_pieces = t_dec + 2 * dec_groups
    pre_tiles = max_num_tokens // (pre_bm // qpk) + max_num_seqs
    # prefill tiles split only when there are fewer than T of them: pieces <= T + 2 * tiles < 3T
    pre_items, pre_groups = max(pre_tiles, 3 * t_pre), min(pre_tiles, t_pre)
    packed = sum(_align(n) for n in (4, 7 * dec_items, 5 * dec_groups, 7 * pre_items, 5 * pre_groups))
    return PlanBounds(packed_ints=packed, partial_rows=dec_pieces * G * dec_bm + 3 * t_pre * G * pre_bm)


# ---- the configs table (JSON data files in model/configs, keyed by device name and kind) ----------------------

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch settings of one kernel kind. block_m is the plan's (prefill tiles)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_config(kind: str, head_dim: int) -> AttentionConfig:
    """Heuristic fallback: Hopper-shaped tiles (FA-2 style prefill, deep-pipelined decode)."""
    if kind == "decode":
        return AttentionConfig(block_m=16, block_n=64 if head_dim >= 128 else 128, num_warps=4, num_stages=3)
    return AttentionConfig(block_m=128, block_n=64, num_warps=8, num_stages=3 if head_dim >= 128 else 4)


def config_key(kind: str, head_dim: int, qpk: int) -> str:
    return f"{kind}/d{head_dim}/qpk{qpk}"


def attention_config(kind: str, head_dim: int, qpk: int, device_name: str | None,
                     table: dict | None = None) -> AttentionConfig:
    """The measured config for (device, kind, head dim, QPK), else the device's entry for the same
    kind and head dim with another QPK, else `default_config`. `table` defaults to every
    model/configs/attention_*.json merged ({device name: {config_key: {block_m, ...}}})."""
    if table is None:
        table = load_config_table()
    entries = table.get(device_name or "", {})
    exact = entries.get(config_key(kind, head_dim, qpk))
    if exact is None:
        prefix = f"{kind}/d{head_dim}/"
        exact = next((v for k, v in sorted(entries.items()) if k.startswith(prefix)), None)
    return AttentionConfig(**exact) if exact is not None else default_config(kind, head_dim)


def load_config_table() -> dict:
    table: dict = {}
    for path in sorted(CONFIG_DIR.glob("attention_*.json")):
        for device, entries in json.loads(path.read_text()).items():
            table.setdefault(device, {}).update(entries)
    return table


# ---- the plain-torch reference ---------------------------------------------------------------------------------

def paged_attention_reference(
    q_THd: torch.Tensor, kv_2NSGd: torch.Tensor, block_table_BM: torch.Tensor, seq_lens_B: torch.Tensor,
    query_start_B1: torch.Tensor, *, scale: float, sliding_window: int | None = None, q_chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query row over its sequence's cached keys, sequence by sequence in
    float32, written for clarity. Returns (out_THd float32, lse_TH float32, natural log); a row
    with no key to attend (impossible with a positive window) gets out 0 and lse -inf."""
    T, H, d = q_THd.shape
    S, G = kv_2NSGd.shape[2], kv_2NSGd.shape[3]
    out_THd = torch.zeros(T, H, d, dtype=torch.float32, device=q_THd.device)
    lse_TH = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q_THd.device)
    starts, lens = query_start_B1.tolist(), seq_lens_B.tolist()
    for b, seq_len in enumerate(lens):
        t0, t1 = starts[b], starts[b + 1]
        if t1 == t0:
            continue
        pos_L = torch.arange(seq_len, device=q_THd.device)
        slots = block_table_BM[b, pos_L // S].long() * S + pos_L % S
        k_LHd = kv_2NSGd[0].reshape(-1, G, d)[slots].float().repeat_interleave(H // G, dim=1)
        v_LHd = kv_2NSGd[1].reshape(-1, G, d)[slots].float().repeat_interleave(H // G, dim=1)
        for c0 in range(t0, t1, q_chunk):  # a few hundred rows at a time bounds the score tensor
            c1 = min(t1, c0 + q_chunk)
            qpos_Q = seq_len - (t1 - t0) + torch.arange(c0 - t0, c1 - t0, device=q_THd.device)
            allowed_QL = pos_L[None, :] <= qpos_Q[:, None]
            if sliding_window is not None:
                allowed_QL &= pos_L[None, :] > qpos_Q[:, None] - sliding_window
            scores_HQL = torch.einsum("qhd,lhd->hql", q_THd[c0:c1].float(), k_LHd) * scale
            scores_HQL = scores_HQL.masked_fill(~allowed_QL, float("-inf"))
            lse_HQ = torch.logsumexp(scores_HQL, dim=-1)
            probs_HQL = torch.exp(scores_HQL - lse_HQ[..., None].clamp_min(torch.finfo(torch.float32).min))
            out_THd[c0:c1] = torch.einsum("hql,lhd->qhd", probs_HQL, v_LHd)
            lse_TH[c0:c1] = lse_HQ.T
    return out_THd, lse_TH


__all__ = ["AttentionConfig", "AttentionPlan", "AttentionPlanBuffers", "AttentionPlanTensors", "PlanBounds", "WorkList",
           "attention_config", "attention_sms", "default_config", "paged_attention_reference", "plan_attention",
           "plan_bounds", "plan_to_device"]
