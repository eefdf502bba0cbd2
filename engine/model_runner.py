"""The model runner: one device's model, KV cache and sampler; turns a `StepPlan` into tokens.

One step, `submit` then `collect` (`execute` is both):
  1. drop finished requests, register new ones (tokens, sampling params, seeded generator);
  2. flatten the chunks into one token batch (no padding) and build the attention metadata;
     inputs that are samples of a step still in flight (async scheduling: PLACEHOLDERs in the
     request's tokens) are copied from that step's token tensor on the device;
  3. forward, logits only at the last position of each chunk that samples;
  4. sample all of them at once (rows the plan sends a token mask for sample only allowed
     tokens); the tokens are copied to pinned host memory without waiting, and each request's
     tokens gain a PLACEHOLDER;
  5. `collect` waits for that copy and writes the tokens over their placeholders.

Two paths, chosen once from the device (`kernels`):
  - plain torch (the CPU path and the oracle): metadata from `AttentionMetadata.build`;
  - the kernel path (CUDA): the step's inputs go through `StepInputs` (pinned staging, one
    non-blocking copy, buffers that never move), attention reads the cache through the block
    table, and decode-only steps replay a CUDA graph of the whole forward (`DecodeGraphs`),
    padded to the next captured batch size. The only host sync of a step is the wait for the
    sampled tokens' copy (`SamplerOutput.wait`, in `collect`).

The runner is device-agnostic and knows nothing of Ray: the in-process executor calls it
directly, and each rank of an EP group runs one.
"""
from __future__ import annotations

import collections
import functools
import gc
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from expertmesh.engine.config import CacheConfig, ModelLoadConfig, SchedulerConfig
from expertmesh.engine.cuda_graphs import DecodeGraphs, capture_sizes
from expertmesh.engine.model_files import model_dir
from expertmesh.engine.sampler import Sampler, SamplerOutput, SamplingBatch, SamplingRow, make_generator, to_device
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.scheduler import PLACEHOLDER
from expertmesh.engine.step import StepPlan, StepResult, TokenMasks
from expertmesh.engine.step_inputs import HostStep, StepInputs, host_step
from expertmesh.model.attention import AttentionMetadata, KernelAttentionPlanner
from expertmesh.model.config import ModelConfig
from expertmesh.model.decoder import CausalLM, use_fast_kernels
from expertmesh.model.loader import fp8_covers, init_dummy_weights, load_weights
from expertmesh.model.moe import SparseMoeBlock
from expertmesh.model.quantization import fp8_layout_problem
from expertmesh.model.sharded_attention import ShardedAttention, row_counts

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def unpack_token_bitmask(bitmask_NW: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [N, W] packed masks (xgrammar's layout: bit t % 32 of word t // 32) -> bool [N, vocab_size]."""
    shifts_32 = torch.arange(32, dtype=torch.int32, device=bitmask_NW.device)
    bits_NW32 = (bitmask_NW.unsqueeze(-1) >> shifts_32) & 1
    allowed_NV = bits_NW32.flatten(1).bool()
    if allowed_NV.shape[1] < vocab_size:
        raise ValueError(f"a token mask of {allowed_NV.shape[1]} tokens for a vocabulary of {vocab_size}")
    return allowed_NV[:, :vocab_size]


_EMPTY_STEP = HostStep(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64),
                       np.zeros(0, np.int64), [], np.zeros(0, np.int64))
"""A step with no sequence: padded, the rows a graph replays on a rank with nothing to compute."""


@dataclass
class _RequestState:
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    pending: tuple[_PendingStep, int] | None = None
    """The step in flight whose sample is this request's last output token (a PLACEHOLDER until
    that step is collected), and its row there."""

    @functools.cached_property
    def masked_params(self) -> SamplingParams:
        """The params of a step that brings a token mask: min_tokens does not apply there (the
        grammar decides when the output may end; masking EOS too could leave no token)."""
        return self.params if self.params.min_tokens == 0 else replace(self.params, min_tokens=0)

    def tokens(self, start: int, n: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if start + n <= prompt_len:
            return self.prompt_token_ids[start: start + n]
        head = self.prompt_token_ids[start: prompt_len] if start < prompt_len else []
        tail_start = max(start - prompt_len, 0)
        return head + self.output_token_ids[tail_start: start + n - prompt_len]


def fixed_capacity_sizes(dispatcher, sizes: list[int], top_k: int, exchange_shape: dict) -> list[int]:
    """The decode batch sizes an all-to-all dispatcher would exchange at a fixed capacity (none
    without `supports_fixed_capacity`; none past its byte cap): the exact-split exchange reads
    sizes on the host, which a CUDA graph cannot capture."""
    fitting = []
    for size in sizes:
        dispatcher.begin_step(size, top_k, **exchange_shape)
        if dispatcher.capacity is not None:
            fitting.append(size)
    return fitting


class ModelRunner:
    def __init__(self, load: ModelLoadConfig, cache: CacheConfig, model_config: ModelConfig | None = None,
                 *, scheduler: SchedulerConfig | None = None, rank: int = 0, ep_size: int = 1,
                 expert_ids: list[int] | None = None, dispatcher=None, device: torch.device | None = None,
                 progress: bool = True) -> None:
        self.rank, self.ep_size = rank, ep_size
        self.device = device or resolve_device(load.device)
        self.dtype = resolve_dtype(load.dtype, self.device)
        checkpoint = model_dir(load)
        self.model_config = model_config or ModelConfig.from_pretrained(checkpoint)
        self.block_size = cache.block_size
        self.fp8_weights = keeps_fp8_weights(self.model_config, load, self.device, checkpoint)
        self.model = CausalLM(self.model_config, expert_ids=expert_ids, dispatcher=dispatcher,
                              expert_impl=load.expert_impl, kernels=load.kernels, device=self.device, dtype=self.dtype,
                              fp8_weights=self.fp8_weights)
        if load.load_format == "dummy":
            init_dummy_weights(self.model, seed=load.seed)
        else:
            load_weights(self.model, checkpoint, self.model_config, expert_ids, progress=progress)
        self.num_blocks = cache.num_blocks or self._blocks_that_fit(cache)
        c = self.model_config
        # One block more than the block manager hands out: the scratch block of padding rows.
        self.kv_caches = [
            torch.zeros(2, self.num_blocks + 1, self.block_size, c.num_kv_heads, c.head_dim,
                        device=self.device, dtype=self.dtype)
            for _ in range(c.num_layers)
        ]
        self.sampler = Sampler()
        self.requests: dict[str, _RequestState] = {}
        self._pending: collections.deque[_PendingStep] = collections.deque()
        self.inputs: StepInputs | None = None
        self.graphs: DecodeGraphs | None = None
        if self.model.fast:
            self._init_kernel_path(load, scheduler or SchedulerConfig())

    def _init_kernel_path(self, load: ModelLoadConfig, scheduler: SchedulerConfig) -> None:
        c = self.model_config
        max_len = load.max_model_len or c.max_position_embeddings
        max_seqs = scheduler.max_num_seqs
        max_tokens = max(scheduler.max_num_batched_tokens, max_seqs)
        self.planner = KernelAttentionPlanner(c, self.device, max_seqs=max_seqs, max_tokens=max_tokens)
        self.inputs = StepInputs(self.device, max_tokens, max_seqs, -(-max_len // self.block_size),
                                 scratch_block=self.num_blocks, block_size=self.block_size)
        if not load.enforce_eager:
            self.graphs = DecodeGraphs(self._graph_forward, self._graph_prepare,
                                       capture_sizes(min(max_seqs, max_tokens)), self.device)

    def capture_graphs(self, progress: bool = True) -> None:
        """Record the decode graphs (after the dispatcher is set up), the last step of start-up;
        then, on a GPU, freeze the garbage collector's heap (`freeze_startup_heap`)."""
        if self.graphs is not None:
            dispatcher = self.model.dispatcher
            if hasattr(dispatcher, "begin_step"):  # only sizes whose exchange has a fixed capacity
                self.graphs.sizes = fixed_capacity_sizes(dispatcher, self.graphs.sizes, self.model_config.top_k,
                                                         self._exchange_shape)
            if not self.graphs.sizes or not all(
                    m.capturable for m in self.model.modules() if isinstance(m, SparseMoeBlock)):
                self.graphs = None  # exact-split all-to-alls or batched experts read sizes on the host
            else:
                self.graphs.capture(progress=progress)
        if self.device.type == "cuda":
            freeze_startup_heap()

    @property
    def bytes_per_block(self) -> int:
        c = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * c.num_kv_heads * c.head_dim * itemsize * c.num_layers

    def _blocks_that_fit(self, cache: CacheConfig) -> int:
        budget = cache.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            torch.cuda.empty_cache()  # what loading freed (a load's temporaries) is not the weights'
            budget = gpu_kv_budget(*torch.cuda.mem_get_info(self.device), cache.gpu_memory_utilization)
        if budget is None:
            budget = cache.cpu_kv_cache_bytes
        blocks = budget // self.bytes_per_block - 1  # the scratch block
        if blocks < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of {self.bytes_per_block} bytes")
        return int(blocks)

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step and return its tokens (submit, then collect)."""
        if self._pending:
            raise RuntimeError("execute with a step in flight: collect it first")
        self.submit(plan)
        return self.collect()

    @torch.inference_mode()
    def submit(self, plan: StepPlan) -> None:
        """Launch one step: inputs staged, forward and sampling queued on the device, its tokens
        copied back without waiting. Samples of a step still in flight that this step's inputs
        need (async scheduling: the engine scheduled them as placeholders) are taken from the
        device. `collect` returns the results, oldest step first."""
        start = time.perf_counter()
        pending = self._launch(plan)
        pending.seconds += time.perf_counter() - start
        self._pending.append(pending)

    @torch.inference_mode()
    def collect(self) -> StepResult:
        """The oldest submitted step's tokens (waits for the device: the step's one host sync);
        each fills its placeholder in its request's tokens."""
        start = time.perf_counter()
        pending = self._pending.popleft()
        result = pending.result()
        return replace(result, compute_seconds=pending.seconds + time.perf_counter() - start)

    def _launch(self, plan: StepPlan) -> _PendingStep:
        arrivals = {  # built first: a request that cannot be set up leaves the runner as it was
            new.request_id: _RequestState(list(new.prompt_token_ids), new.params, new.eos_token_ids,
                                          make_generator(new.params.seed, self.device), list(new.output_token_ids))
            for new in plan.new_requests if new.rank == self.rank}
        for request_id in plan.finished_request_ids:  # earlier plans' sequences: an id may come back below
            self.requests.pop(request_id, None)
        self.requests.update(arrivals)
        chunks = plan.chunks_by_rank[self.rank]
        graph_size = self._graph_size(plan)
        sharded = self._sharded_rows(plan)
        dispatcher = self.model.dispatcher
        if hasattr(dispatcher, "begin_step"):  # an all-to-all dispatcher: every rank picks the same mode
            max_tokens = graph_size or max(rank_chunks.total_tokens + (sharded.counts[r] if sharded else 0)
                                           for r, rank_chunks in enumerate(plan.chunks_by_rank))
            dispatcher.begin_step(max_tokens, self.model_config.top_k, **self._exchange_shape)
        if not len(chunks) and (sharded is None or not sharded.num_rows):  # others compute: join their exchanges
            if graph_size is not None:
                self._logits(_EMPTY_STEP, graph_size)
            elif sharded is not None:  # and their sharded attention's collectives
                self._logits(_EMPTY_STEP, None, sharded=sharded)
            elif plan.num_chunks and self.ep_size > 1:
                self.model(torch.empty(0, dtype=torch.int64, device=self.device), None, self.kv_caches)
            return _PendingStep()
        states = [self.requests[rid] for rid in chunks.request_ids]
        tokens = [s.tokens(int(start), int(n)) for s, start, n in zip(states, chunks.starts, chunks.num_tokens)]
        step = host_step(chunks.starts, chunks.num_tokens, tokens,
                         [chunks.block_table(i) for i in range(len(chunks))], chunks.sample, self.block_size)
        fills = _placeholder_fills(states, chunks.starts, step.query_start_B1)
        logits_BV = self._logits(step, graph_size, fills, sharded)
        if logits_BV is None:
            return _PendingStep()
        request_ids = tuple(chunks.request_ids[i] for i in np.flatnonzero(chunks.sample))
        sampling = [states[i] for i in np.flatnonzero(chunks.sample)]
        if sharded is not None:
            request_ids += sharded.sampling_ids
            sampling += [self.requests[rid] for rid in sharded.sampling_ids]
        masks = plan.token_masks[self.rank] if plan.token_masks else None
        masked_rows, allowed_BV = self._allowed_tokens(masks, request_ids, logits_BV.shape[-1])
        rows = [SamplingRow(s.masked_params if b in masked_rows else s.params, s.prompt_token_ids,
                            s.output_token_ids, s.generator, s.eos_token_ids)
                for b, s in enumerate(sampling)]
        batch = SamplingBatch.build(rows, logits_BV.shape[-1], self.device, allowed_token_mask_BV=allowed_BV)
        if batch.any_penalties and any(s.pending is not None for s in sampling):
            raise RuntimeError("penalties read every output token: a step with them cannot run before the "
                               "step in flight has returned its tokens (the engine schedules it synchronously)")
        out = self.sampler(logits_BV, batch)
        pending = _PendingStep(request_ids, sampling, out.token_ids_B, out.to_host())
        for row, state in enumerate(pending.states):  # only now: a step that raised above left no trace
            pending.indices.append(len(state.output_token_ids))
            state.output_token_ids.append(PLACEHOLDER)
            state.pending = (pending, row)
        return pending

    def _sharded_rows(self, plan: StepPlan) -> _ShardedRows | None:
        """This rank's rows of the plan's sharded sequences (None when it has none anywhere)."""
        if not plan.sharded:
            return None
        world, unit = self.ep_size, self.block_size
        counts = np.zeros(world, dtype=np.int64)
        ids, rows, sampling_ids, sampling_rows = [], [], [], []
        for c in plan.sharded:
            counts += row_counts(c.start, c.num_tokens, c.sample, c.home, world, unit)
            positions = c.positions(self.rank, world, unit)
            if c.sample and c.home == self.rank:
                sampling_ids.append(c.request_id)
                sampling_rows.append(sum(map(len, rows)) + len(positions) - 1)
            ids.append(c.token_ids[positions - c.start])
            rows.append(positions)
        input_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        return _ShardedRows(plan.sharded, counts.tolist(), input_ids, tuple(sampling_ids),
                            np.array(sampling_rows, dtype=np.int64))

    @functools.cached_property
    def _exchange_shape(self) -> dict:
        """What an all-to-all dispatcher's `begin_step` sizes a fixed-capacity exchange from."""
        return {"hidden_size": self.model_config.hidden_size, "dtype": self.dtype}

    def _graph_size(self, plan: StepPlan) -> int | None:
        """The captured batch size to replay: only when every rank's step is decode-only (all ranks
        replay the same size together, so their all-to-alls match) and fits a graph."""
        if self.graphs is None or not plan.num_chunks or plan.sharded:
            return None
        for rank_chunks in plan.chunks_by_rank:
            if len(rank_chunks) and not (rank_chunks.sample.all() and (rank_chunks.num_tokens == 1).all()):
                return None
        return self.graphs.size_for(max(len(rank_chunks) for rank_chunks in plan.chunks_by_rank))

    def _logits(self, step: HostStep, graph_size: int | None, fills: list[_Fill] = (),
                sharded: _ShardedRows | None = None) -> torch.Tensor | None:
        """Forward of the step; logits [rows that sample, V] (None if none samples). `fills`: the
        input rows that take a sample of a step still in flight (placeholders on the host).
        `sharded`: this rank's rows of sharded sequences, after the step's own."""
        if graph_size is not None:
            self.inputs.upload(step, pad_seqs_to=graph_size)
            self._fill_placeholders(self.inputs.field("input_ids", step.num_tokens), fills)
            self.planner.plan(step.query_start_B1, step.seq_lens_B, pad_to=graph_size)
            return self.graphs.run(graph_size)[: step.num_seqs]
        if self.inputs is None:  # the plain-torch path
            query_lens = np.diff(step.query_start_B1)
            meta = AttentionMetadata.empty(self.device)
            if step.num_seqs:
                meta = AttentionMetadata.build(
                    query_lens=query_lens.tolist(), starts=(step.seq_lens_B - query_lens).tolist(),
                    block_tables=step.block_tables, block_size=self.block_size, device=self.device,
                    sliding_window=self.model_config.sliding_window)
            input_ids_T = to_device(step.input_ids_T, self.device)
            self._fill_placeholders(input_ids_T, fills)
            logits_rows = None if step.decode_only else to_device(step.logits_rows, self.device)
        else:
            self.inputs.upload(step)
            input_ids_T = self.inputs.field("input_ids", step.num_tokens)
            self._fill_placeholders(input_ids_T, fills)
            if step.num_seqs:
                self.planner.plan(step.query_start_B1, step.seq_lens_B)
                meta = self._kernel_meta(step.num_tokens, step.num_seqs)
            else:
                meta = AttentionMetadata.empty(self.device)
            logits_rows = None if step.decode_only else self.inputs.field("logits_rows", len(step.logits_rows))
        num_logits = len(step.logits_rows)
        if sharded is not None:
            c = self.model_config
            meta = replace(meta, sp=ShardedAttention.build(
                sharded.chunks, rank=self.rank, world=self.ep_size, block_size=self.block_size,
                num_regular=step.num_tokens, device=self.device,
                kernel_heads=(c.num_heads, c.num_kv_heads) if self.model.fast else None))
            input_ids_T = torch.cat((input_ids_T, to_device(sharded.input_ids, self.device).to(input_ids_T.dtype)))
            num_logits += len(sharded.sampling_rows)
            rows = np.concatenate((step.logits_rows, step.num_tokens + sharded.sampling_rows))
            logits_rows = to_device(rows, self.device)
        hidden_TD = self.model(input_ids_T, meta, self.kv_caches)
        if not num_logits:
            return None
        return self.model.compute_logits(hidden_TD if logits_rows is None else hidden_TD[logits_rows])

    def _fill_placeholders(self, input_ids_T: torch.Tensor, fills: list[_Fill]) -> None:
        """Write each fill's sampled tokens (still on the device) into the step's input ids: a
        copy of a slice in the steady state of async decoding (row i takes sample i), else an
        indexed copy."""
        for fill in fills:
            n = len(fill.rows_T)
            if fill.contiguous:
                input_ids_T[:n].copy_(fill.token_ids_B[:n])
            else:
                rows_T, samples_T = to_device(np.stack([fill.rows_T, fill.samples_T]), self.device)  # one copy
                input_ids_T[rows_T] = fill.token_ids_B[samples_T].to(input_ids_T.dtype)

    def _kernel_meta(self, num_tokens: int, num_seqs: int) -> AttentionMetadata:
        """Views of the static device inputs for a step of `num_tokens` tokens in `num_seqs` sequences."""
        f = self.inputs.field
        return AttentionMetadata(
            positions_T=f("positions", num_tokens), slot_mapping_T=f("slot_mapping", num_tokens),
            query_start_B1=f("query_start", num_seqs + 1),
            kernel=self.planner.kernel_inputs(self.inputs.block_table_BM[:num_seqs], f("seq_lens", num_seqs)))

    def _graph_prepare(self, size: int) -> None:
        """Static inputs of `size` padding rows (what capture records against)."""
        self.inputs.upload(_EMPTY_STEP, pad_seqs_to=size)
        self.planner.plan(_EMPTY_STEP.query_start_B1, _EMPTY_STEP.seq_lens_B, pad_to=size)
        if hasattr(self.model.dispatcher, "begin_step"):
            self.model.dispatcher.begin_step(size, self.model_config.top_k, **self._exchange_shape)

    def _graph_forward(self, size: int) -> torch.Tensor:
        stats = self.model.expert_load
        if stats is not None:  # padding rows route somewhere too: the counters weigh copies by validity
            valid_N = self.inputs.field("valid", size).to(torch.int64).repeat_interleave(self.model_config.top_k)
            stats.copy_weights_N = valid_N
        try:
            hidden_TD = self.model(self.inputs.field("input_ids", size), self._kernel_meta(size, size), self.kv_caches)
            return self.model.compute_logits(hidden_TD)
        finally:
            if stats is not None:
                stats.copy_weights_N = None

    def _allowed_tokens(self, masks: TokenMasks | None, request_ids: tuple[str, ...],
                        vocab_size: int) -> tuple[frozenset[int], torch.Tensor | None]:
        """(batch rows with a mask, bool [B, V] allowed tokens: unpacked masks there, True elsewhere)."""
        if masks is None or not len(masks):
            return frozenset(), None
        row_of = {rid: j for j, rid in enumerate(masks.request_ids)}
        pairs = [(b, row_of[rid]) for b, rid in enumerate(request_ids) if rid in row_of]
        if not pairs:
            return frozenset(), None
        batch_rows, mask_rows = zip(*pairs)
        bitmask_NW = to_device(masks.bitmask[list(mask_rows)], self.device)
        allowed_BV = torch.ones(len(request_ids), vocab_size, dtype=torch.bool, device=self.device)
        allowed_BV[to_device(np.array(batch_rows, dtype=np.int64), self.device)] = unpack_token_bitmask(
            bitmask_NW, vocab_size)
        return frozenset(batch_rows), allowed_BV

    def expert_load(self) -> torch.Tensor | None:
        stats = self.model.expert_load
        return None if stats is None else stats.snapshot()


@dataclass
class _PendingStep:
    """A submitted step whose tokens may still be on the device."""

    request_ids: tuple[str, ...] = ()
    """The rows that sample, in order."""
    states: list[_RequestState] = field(default_factory=list)
    token_ids_B: torch.Tensor | None = None
    """The sampled tokens on the device (the next step's inputs read them there)."""
    host: SamplerOutput | None = None
    """Their copy on the host (`SamplerOutput.to_host`: ready once its event has passed)."""
    indices: list[int] = field(default_factory=list)
    """Where each row's placeholder sits in its request's output tokens."""
    seconds: float = 0.0

    def result(self) -> StepResult:
        if self.host is None:
            return StepResult()
        host = self.host.wait()
        token_ids = host.token_ids_B.tolist()
        logprobs = {}
        for row, (state, index, token_id) in enumerate(zip(self.states, self.indices, token_ids)):
            state.output_token_ids[index] = token_id
            if state.pending is not None and state.pending[0] is self:
                state.pending = None
            if state.params.logprobs is not None:
                logprob, top = host.row_logprobs(row, state.params.logprobs)
                logprobs[self.request_ids[row]] = (logprob, tuple(top))
        return StepResult(self.request_ids, tuple(token_ids), logprobs or None)


@dataclass(frozen=True)
class _ShardedRows:
    """This rank's part of a step's sharded sequences (model/sharded_attention.py)."""

    chunks: tuple
    """The plan's `ShardedChunk`s (every rank's)."""
    counts: list[int]
    """Sharded rows of every rank this step."""
    input_ids: np.ndarray
    """int64: this rank's rows' tokens, chunk after chunk, ascending positions within each."""
    sampling_ids: tuple[str, ...]
    """The sequences this rank samples (it is their home, and the step reaches their end)."""
    sampling_rows: np.ndarray
    """int64: their rows among this rank's sharded rows."""

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class _Fill:
    """Rows of a step's flat input that take tokens sampled by one earlier step still in flight."""

    token_ids_B: torch.Tensor
    rows_T: np.ndarray
    """int64: the input rows."""
    samples_T: np.ndarray
    """int64: the row of that step's samples each takes."""
    contiguous: bool
    """rows_T == samples_T == 0..n-1 (one copy of a slice)."""


def _placeholder_fills(states: list[_RequestState], starts: np.ndarray, query_start_B1: np.ndarray) -> list[_Fill]:
    """Where this step's inputs hold placeholders, and which in-flight sample fills each: one per
    sequence whose last sample is still on the device, at that sample's position if this step's
    chunk covers it."""
    by_step: dict[int, tuple[_PendingStep, list[int], list[int]]] = {}
    for b, state in enumerate(states):
        if state.pending is None:
            continue
        pending, sample_row = state.pending
        position = len(state.prompt_token_ids) + len(state.output_token_ids) - 1  # where its placeholder sits
        offset = position - int(starts[b])
        if 0 <= offset < int(query_start_B1[b + 1] - query_start_B1[b]):
            _, rows, samples = by_step.setdefault(id(pending), (pending, [], []))
            rows.append(int(query_start_B1[b]) + offset)
            samples.append(sample_row)
    fills = []
    for pending, rows, samples in by_step.values():
        contiguous = rows == samples == list(range(len(rows)))
        fills.append(_Fill(pending.token_ids_B, np.array(rows, dtype=np.int64), np.array(samples, dtype=np.int64),
                           contiguous))
    return fills


def keeps_fp8_weights(config: ModelConfig, load: ModelLoadConfig, device: torch.device, checkpoint) -> bool:
    """Whether an FP8 checkpoint's linear layers stay FP8 in memory (half the bytes of bf16, read
    by the Triton kernels): on the kernel path with the fused experts, when its scale blocks fit
    the fused parameters and it quantized every one of them. Otherwise they load dequantized
    into the model's dtype (the reference path, and the CPU's), and the log says why."""
    if config.quantization is None:
        return False
    why = None
    if not use_fast_kernels(load.kernels, device):
        why = "the plain-torch path (kernels 'torch', or no CUDA) runs dequantized weights"
    elif device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        why = (f"{torch.cuda.get_device_name(device)} (compute capability "
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) has no float8 e4m3 type; Triton "
               "reads it from 8.9 (Ada, Hopper) on")
    elif load.expert_impl not in ("auto", "triton"):
        why = f"expert_impl {load.expert_impl!r} multiplies dequantized weights"
    else:
        why = fp8_layout_problem(config)
        if why is None and load.load_format != "dummy" and not fp8_covers(checkpoint, config):
            why = "the checkpoint leaves some of the linear layers unquantized"
    if why is None:
        log.info("FP8 checkpoint: linear layers stay FP8 (%s scales), read by the Triton kernels",
                 config.quantization.strategy)
        return True
    log.info("FP8 checkpoint loads dequantized to %s: %s", load.dtype, why)
    return False


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive after start-up (the model's modules, the
    tokenizer, Triton's and torch's caches: millions of them) out of the garbage collector's
    reach (`gc.freeze`, as vLLM does after start-up). Otherwise each full collection walks them
    all: on the H200 a 126 ms pause in the middle of a 15 ms decode step at batch 256. Only on a
    GPU: there the pause is a spike users see, while a CPU process (tests build many engines in
    one) keeps its heap collectable."""
    gc.collect()
    gc.freeze()


def gpu_kv_budget(free_bytes: int, total_bytes: int, gpu_memory_utilization: float) -> int:
    """Bytes for the KV cache once the weights are loaded: the engine may use
    `gpu_memory_utilization` of the GPU's total memory, of which what is already used (the weights,
    and whatever else runs on the GPU) is gone. vLLM's --gpu-memory-utilization, without its
    profiling run: the part of the total left out is the activations' headroom.

        >>> gpu_kv_budget(free_bytes=60, total_bytes=100, gpu_memory_utilization=0.9)  # 40 in use
        50
    """
    budget = int(total_bytes * gpu_memory_utilization) - (total_bytes - free_bytes)
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization {gpu_memory_utilization} leaves no memory for the KV cache: "
                         f"{total_bytes - free_bytes} of the GPU's {total_bytes} bytes are in use already "
                         "(raise it, or give num_kv_blocks or kv_cache_memory_bytes)")
    return budget
