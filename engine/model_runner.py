"""The model runner: one device's model, KV cache and sampler; turns a `StepPlan` into tokens.

One step:
  1. register new requests (tokens, sampling params, seeded generator), drop finished ones;
  2. flatten the chunks into one token batch (no padding) and build the attention metadata;
  3. forward, logits only at the last position of each chunk that samples;
  4. sample all of them at once (rows the plan sends a token mask for sample only allowed
     tokens); append each sampled token to its request's tokens.

The runner is device-agnostic and knows nothing of Ray: the in-process executor calls it
directly, and each rank of an EP group will run one.
"""
from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from expertmesh.engine.config import CacheConfig, ModelLoadConfig
from expertmesh.engine.model_files import model_dir
from expertmesh.engine.sampler import Sampler, SamplingBatch, SamplingRow, make_generator
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.step import StepPlan, StepResult, TokenMasks
from expertmesh.model.attention import AttentionMetadata
from expertmesh.model.config import ModelConfig
from expertmesh.model.decoder import CausalLM
from expertmesh.model.loader import init_dummy_weights, load_weights

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


@dataclass
class _RequestState:
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)

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


class ModelRunner:
    def __init__(self, load: ModelLoadConfig, cache: CacheConfig, model_config: ModelConfig | None = None,
                 *, rank: int = 0, ep_size: int = 1, expert_ids: list[int] | None = None, dispatcher=None,
                 device: torch.device | None = None, progress: bool = True) -> None:
        self.rank, self.ep_size = rank, ep_size
        self.device = device or resolve_device(load.device)
        self.dtype = resolve_dtype(load.dtype, self.device)
        checkpoint = model_dir(load)
        self.model_config = model_config or ModelConfig.from_pretrained(checkpoint)
        self.block_size = cache.block_size
        self.model = CausalLM(self.model_config, expert_ids=expert_ids, dispatcher=dispatcher,
                              expert_impl=load.expert_impl, device=self.device, dtype=self.dtype)
        if load.load_format == "dummy":
            init_dummy_weights(self.model, seed=load.seed)
        else:
            load_weights(self.model, checkpoint, self.model_config, expert_ids, progress=progress)
        self.num_blocks = cache.num_blocks or self._blocks_that_fit(cache)
        c = self.model_config
        self.kv_caches = [
            torch.zeros(2, self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim,
                        device=self.device, dtype=self.dtype)
            for _ in range(c.num_layers)
        ]
        self.sampler = Sampler()
        self.requests: dict[str, _RequestState] = {}

    @property
    def bytes_per_block(self) -> int:
        c = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * c.num_kv_heads * c.head_dim * itemsize * c.num_layers

    def _blocks_that_fit(self, cache: CacheConfig) -> int:
        budget = cache.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            budget = gpu_kv_budget(*torch.cuda.mem_get_info(self.device), cache.gpu_memory_utilization)
        if budget is None:
            budget = cache.cpu_kv_cache_bytes
        blocks = budget // self.bytes_per_block
        if blocks < 1:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds no block of {self.bytes_per_block} bytes")
        return int(blocks)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        result = self._execute(plan)
        return replace(result, compute_seconds=time.perf_counter() - start)

    def _execute(self, plan: StepPlan) -> StepResult:
        arrivals = {  # built first: a request that cannot be set up leaves the runner as it was
            new.request_id: _RequestState(list(new.prompt_token_ids), new.params, new.eos_token_ids,
                                          make_generator(new.params.seed, self.device), list(new.output_token_ids))
            for new in plan.new_requests if new.rank == self.rank}
        self.requests.update(arrivals)
        for request_id in plan.finished_request_ids:  # after: a request may arrive and end in one plan
            self.requests.pop(request_id, None)
        chunks = plan.chunks_by_rank[self.rank]
        dispatcher = self.model.dispatcher
        if self.ep_size > 1 and hasattr(dispatcher, "begin_step"):
            max_tokens = max(rank_chunks.total_tokens for rank_chunks in plan.chunks_by_rank)
            row_bytes = self.model_config.hidden_size * torch.empty((), dtype=self.dtype).element_size()
            dispatcher.begin_step(max_tokens, self.model_config.top_k, row_bytes=row_bytes)
        if not len(chunks):
            if plan.num_chunks and self.ep_size > 1:  # other ranks compute: join their all-to-alls
                self.model(torch.empty(0, dtype=torch.int64, device=self.device), None, self.kv_caches)
            return StepResult()
        states = [self.requests[rid] for rid in chunks.request_ids]
        starts, num_tokens = chunks.starts.tolist(), chunks.num_tokens.tolist()
        input_ids = list(itertools.chain.from_iterable(
            s.tokens(start, n) for s, start, n in zip(states, starts, num_tokens)))
        meta = AttentionMetadata.build(
            query_lens=num_tokens, starts=starts,
            block_tables=[chunks.block_table(i) for i in range(len(chunks))], block_size=self.block_size,
            device=self.device, sliding_window=self.model_config.sliding_window)
        hidden_TD = self.model(torch.tensor(input_ids, device=self.device), meta, self.kv_caches)

        sampling = np.flatnonzero(chunks.sample).tolist()
        if not sampling:
            return StepResult()
        if len(sampling) == hidden_TD.shape[0]:  # a decode-only step: every row samples
            logits_BV = self.model.compute_logits(hidden_TD)
        else:
            last_rows = meta.query_start_B1[1:][torch.tensor(sampling, device=self.device)] - 1
            logits_BV = self.model.compute_logits(hidden_TD[last_rows])
        request_ids = tuple(chunks.request_ids[i] for i in sampling)
        masks = plan.token_masks[self.rank] if plan.token_masks else None
        masked_rows, allowed_BV = self._allowed_tokens(masks, request_ids, logits_BV.shape[-1])
        rows = [SamplingRow(s.masked_params if b in masked_rows else s.params, s.prompt_token_ids,
                            s.output_token_ids, s.generator, s.eos_token_ids)
                for b, s in enumerate(states[i] for i in sampling)]
        batch = SamplingBatch.build(rows, logits_BV.shape[-1], self.device, allowed_token_mask_BV=allowed_BV)
        out = self.sampler(logits_BV, batch).cpu()
        token_ids = out.token_ids_B.tolist()
        logprobs = {}
        for row, (i, token_id) in enumerate(zip(sampling, token_ids)):
            state = states[i]
            state.output_token_ids.append(token_id)
            if state.params.logprobs is not None:
                logprob, top = out.row_logprobs(row, state.params.logprobs)
                logprobs[request_ids[row]] = (logprob, tuple(top))
        return StepResult(request_ids, tuple(token_ids), logprobs or None)

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
        bitmask_NW = torch.from_numpy(masks.bitmask[list(mask_rows)]).to(self.device)
        allowed_BV = torch.ones(len(request_ids), vocab_size, dtype=torch.bool, device=self.device)
        allowed_BV[torch.tensor(batch_rows, device=self.device)] = unpack_token_bitmask(bitmask_NW, vocab_size)
        return frozenset(batch_rows), allowed_BV

    def expert_load(self) -> torch.Tensor | None:
        stats = self.model.expert_load
        return None if stats is None else stats.snapshot()


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
