"""The sampler: one token per sequence from the last position's logits, vectorized over the batch.

    rows ──SamplingBatch.build──▶ per-row tensors (once per step; those that follow from the
                                  params alone are reused while the rows' params are the same objects)
    logits_BV ──Sampler──▶ SamplerOutput (token ids, and raw logprobs when asked)

Steps of `Sampler.__call__` (vLLM's order):
 1. Raw logprobs: log_softmax of the unmodified logits, only if some row asked for logprobs.
 2. Masks set to -inf: the grammar's allowed-token mask, then EOS and stop tokens of rows that
    have fewer than min_tokens outputs.
 3. Repetition penalty on tokens of the prompt or the output (positive logits divided, negative
    multiplied), then frequency and presence penalties on output tokens (counts by scatter_add).
 4. Greedy rows take the argmax here; if every row is greedy, stop. (A batch of greedy rows
    with no mask, penalty or logprobs takes the argmax of the logits in their own dtype at
    once: casting to float32 first changes no order, and costs a copy of [B, V].)
 5. Temperature, top-k and top-p (one sort, at least one token kept), then min-p.
 6. Sample by the exponential race, argmax(probs / E) with E ~ Exp(1): rows without their
    own generator draw E in one batched op; seeded rows draw theirs from their generator, so
    the same seed gives the same tokens whatever else is in the batch.

Legend: B rows of the batch, V vocabulary, L padded length of the token-id lists,
M masked (row, token) pairs, N top logprobs returned per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from expertmesh.engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A request's own generator (None without a seed). Create it once per request, on the
    device the logits live on, and pass the same object in every step's SamplingRow."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class SamplingRow:
    """What one sequence that needs a token this step brings to the sampler."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    """The request's own (seeded from params.seed, see `make_generator`), reused across steps."""
    eos_token_ids: frozenset[int]


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling tensors of one step, on the logits' device. Optional tensors are None
    when no row needs them, so the sampler skips that work."""
    vocab_size: int
    temperature_B: torch.Tensor
    """float32; 1.0 on greedy rows (they take the argmax and never divide)."""
    greedy_B: torch.Tensor
    """bool."""
    all_greedy: bool
    top_k_B: torch.Tensor | None
    """int64 in [1, V]; V on rows that keep every token."""
    max_top_k: int
    top_p_B: torch.Tensor | None
    """float32 in (0, 1]."""
    min_p_B: torch.Tensor | None
    """float32 in [0, 1]."""
    repetition_penalty_B: torch.Tensor | None
    presence_penalty_B: torch.Tensor | None
    frequency_penalty_B: torch.Tensor | None
    output_ids_BL: torch.Tensor | None
    """int64 output token ids padded with V; set when a row has a presence, frequency or repetition penalty."""
    prompt_ids_BL: torch.Tensor | None
    """int64 prompt token ids padded with V; set when a row has a repetition penalty."""
    min_tokens_rows_M: torch.Tensor | None
    """int64 rows, paired with min_tokens_ids_M: (row, token) logits to mask while under min_tokens."""
    min_tokens_ids_M: torch.Tensor | None
    seeded_rows: tuple[int, ...]
    """Rows that sample with their own generator (never greedy rows)."""
    generators: tuple[torch.Generator, ...]
    """The generator of each of seeded_rows, in the same order."""
    max_num_logprobs: int | None
    """Most logprobs any row asked for (0: only the sampled token's); None if no row asked."""
    allowed_token_mask_BV: torch.Tensor | None = None
    """bool, True = allowed; filled by the grammar engine (dataclasses.replace), applied first."""

    @property
    def num_rows(self) -> int:
        return self.temperature_B.shape[0]

    @property
    def any_top_k(self) -> bool:
        return self.top_k_B is not None

    @property
    def any_top_p(self) -> bool:
        return self.top_p_B is not None

    @property
    def any_min_p(self) -> bool:
        return self.min_p_B is not None

    @property
    def any_penalties(self) -> bool:
        return self.output_ids_BL is not None

    @property
    def plain_greedy(self) -> bool:
        """Every row takes the argmax of its raw logits: nothing masks, penalizes or asks logprobs."""
        return (self.all_greedy and self.allowed_token_mask_BV is None and self.min_tokens_rows_M is None
                and not self.any_penalties and self.max_num_logprobs is None)

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device | str,
              allowed_token_mask_BV: torch.Tensor | None = None) -> SamplingBatch:
        V = vocab_size
        params = [row.params for row in rows]
        greedy = [p.greedy for p in params]
        # Greedy rows take the argmax whatever their top_k: 1 keeps max_top_k small for topk().
        top_k = [1 if g else min(p.top_k, V) if p.top_k > 0 else V for p, g in zip(params, greedy)]
        per_params = _params_tensors(params, greedy, top_k, V, torch.device(device))
        temperature_B, top_p_B, min_p_B, repetition_B, presence_B, frequency_B = per_params.floats

        any_repetition = any(p.repetition_penalty != 1.0 for p in params)
        any_output_penalty = any_repetition or any(
            p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)

        min_rows, min_ids = [], []
        for i, (row, p) in enumerate(zip(rows, params)):
            if len(row.output_token_ids) < p.min_tokens:
                stop_ids = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | row.eos_token_ids
                stop_ids = sorted(t for t in stop_ids if t < V)
                min_rows += [i] * len(stop_ids)
                min_ids += stop_ids

        seeded = [(i, row.generator) for i, (row, g) in enumerate(zip(rows, greedy))
                  if row.generator is not None and not g]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            vocab_size=V,
            temperature_B=temperature_B,
            greedy_B=per_params.greedy_B,
            all_greedy=all(greedy),
            top_k_B=per_params.top_k_B if any(k < V for k, g in zip(top_k, greedy) if not g) else None,
            max_top_k=max(top_k, default=V),
            top_p_B=top_p_B if any(p.top_p < 1.0 and not p.greedy for p in params) else None,
            min_p_B=min_p_B if any(p.min_p > 0.0 and not p.greedy for p in params) else None,
            repetition_penalty_B=repetition_B if any_repetition else None,
            presence_penalty_B=presence_B if any_output_penalty else None,
            frequency_penalty_B=frequency_B if any_output_penalty else None,
            output_ids_BL=(_pad([r.output_token_ids for r in rows], V, device)
                           if any_output_penalty else None),
            prompt_ids_BL=_pad([r.prompt_token_ids for r in rows], V, device) if any_repetition else None,
            min_tokens_rows_M=to_device(np.array(min_rows, dtype=np.int64), device) if min_rows else None,
            min_tokens_ids_M=to_device(np.array(min_ids, dtype=np.int64), device) if min_rows else None,
            seeded_rows=tuple(i for i, _ in seeded),
            generators=tuple(g for _, g in seeded),
            max_num_logprobs=max(asked) if asked else None,
            allowed_token_mask_BV=allowed_token_mask_BV,
        )


@dataclass(frozen=True)
class _ParamsTensors:
    """The device tensors a batch's rows get from their SamplingParams alone."""
    params: tuple[SamplingParams, ...]
    """The params objects themselves (held, so that their ids cannot be reused while cached)."""
    vocab_size: int
    device: torch.device
    floats: tuple[torch.Tensor, ...]
    """[B] each: temperature (1 on greedy rows), top_p, min_p, repetition, presence, frequency penalties."""
    greedy_B: torch.Tensor
    top_k_B: torch.Tensor


_LAST_PARAMS: list[_ParamsTensors] = []
"""The last batch's per-params tensors: a decode step whose rows are the step before's (the
steady state) reuses them instead of two host-to-device copies per step. The tensors are never
written after they are made, so sharing them between steps is safe."""


def _params_tensors(params: list[SamplingParams], greedy: list[bool], top_k: list[int], V: int,
                    device: torch.device) -> _ParamsTensors:
    last = _LAST_PARAMS[0] if _LAST_PARAMS else None
    if (last is not None and last.vocab_size == V and last.device == device and len(last.params) == len(params)
            and all(a is b for a, b in zip(last.params, params))):
        return last
    floats_6B = to_device(np.array(
        [[1.0 if g else p.temperature for p, g in zip(params, greedy)],
         [p.top_p for p in params],
         [p.min_p for p in params],
         [p.repetition_penalty for p in params],
         [p.presence_penalty for p in params],
         [p.frequency_penalty for p in params]], dtype=np.float32).reshape(6, len(params)), device)
    greedy_B = to_device(np.array(greedy, dtype=bool), device)
    made = _ParamsTensors(tuple(params), V, device, floats_6B.unbind(0), greedy_B,
                          to_device(np.array(top_k, dtype=np.int64), device))
    _LAST_PARAMS[:] = [made]
    return made


def _pad(lists: list[list[int]], pad: int, device: torch.device | str) -> torch.Tensor:
    """[B, L] int64, each list padded with `pad` (the vocab size: an extra, discarded column).
    Filled through numpy: a row at a time in C, ten times faster than torch.tensor on nested lists."""
    ids_BL = np.full((len(lists), max((len(ids) for ids in lists), default=0)), pad, dtype=np.int64)
    for i, ids in enumerate(lists):
        ids_BL[i, :len(ids)] = ids
    return to_device(ids_BL, device)


def to_device(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A host array on `device` without a host sync: through pinned memory and a non-blocking copy
    on CUDA (a pageable copy would wait for the GPU to drain). The caching host allocator keeps the
    pinned block until the copy has run."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids_B: torch.Tensor
    """int64, the sampled token of each row."""
    logprobs_B: torch.Tensor | None
    """float32, log-probability of the sampled token under the raw logits; None if no row asked."""
    top_ids_BN: torch.Tensor | None
    """int64, the N most likely tokens of the raw distribution, most likely first; None if no row asked."""
    top_logprobs_BN: torch.Tensor | None
    """float32, their log-probabilities."""

    ready: torch.cuda.Event | None = None
    """On a host copy made by `to_host` from a GPU: recorded after the copies; `wait` waits for it."""

    def cpu(self) -> SamplerOutput:
        """A copy on the host: call once per step before reading rows (one device sync)."""
        return self.to_host().wait()

    def to_host(self) -> SamplerOutput:
        """A copy on the host that is not waited for: non-blocking copies into pinned memory and an
        event after them. Read it only after `wait()`."""
        if self.token_ids_B.device.type != "cuda":
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        host = SamplerOutput(move(self.token_ids_B), move(self.logprobs_B), move(self.top_ids_BN),
                             move(self.top_logprobs_BN), torch.cuda.Event())
        host.ready.record()
        return host

    def wait(self) -> SamplerOutput:
        """This output once its copies have run (the step's one host sync)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self

    def row_logprobs(self, i: int, n: int) -> tuple[float, list[tuple[int, float]]]:
        """Row i's sampled-token logprob and its n most likely (token_id, logprob), n <= N."""
        if self.logprobs_B is None or self.top_ids_BN is None or self.top_logprobs_BN is None:
            raise ValueError("no row of this batch asked for logprobs")
        if n > self.top_ids_BN.shape[1]:
            raise ValueError(f"asked for {n} logprobs, the batch computed {self.top_ids_BN.shape[1]}")
        ids = self.top_ids_BN[i, :n].tolist()
        values = self.top_logprobs_BN[i, :n].tolist()
        return float(self.logprobs_B[i]), list(zip(ids, values))


class Sampler:
    """Turns logits_BV (any float dtype, on any device) into one token per row; see the module doc."""

    def __call__(self, logits_BV: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits_BV.shape != (batch.num_rows, batch.vocab_size):
            raise ValueError(f"logits of shape {tuple(logits_BV.shape)}, batch of "
                             f"{batch.num_rows} rows over a vocabulary of {batch.vocab_size}")
        if batch.plain_greedy:  # the argmax of the logits as they are: the float32 copy changes no order
            return SamplerOutput(logits_BV.argmax(dim=-1), None, None, None)
        logits_BV = logits_BV.to(torch.float32)
        raw_logprobs_BV = (torch.log_softmax(logits_BV, dim=-1)
                           if batch.max_num_logprobs is not None else None)

        logits_BV = apply_masks(logits_BV, batch)
        if batch.any_penalties:
            logits_BV = apply_penalties(logits_BV, batch)

        if batch.all_greedy:
            token_ids_B = logits_BV.argmax(dim=-1)
        else:
            token_ids_B = self._sample(logits_BV, batch)
        return _with_logprobs(token_ids_B, raw_logprobs_BV, batch.max_num_logprobs)

    def _sample(self, logits_BV: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy_ids_B = logits_BV.argmax(dim=-1)
        logits_BV = logits_BV / batch.temperature_B.unsqueeze(1)
        if batch.any_top_k or batch.any_top_p:
            logits_BV = apply_top_k_top_p(logits_BV, batch.top_k_B, batch.top_p_B, batch.max_top_k)
        probs_BV = torch.softmax(logits_BV, dim=-1)
        if batch.any_min_p:
            max_B1 = probs_BV.amax(dim=-1, keepdim=True)
            probs_BV = probs_BV.masked_fill(probs_BV < batch.min_p_B.unsqueeze(1) * max_B1, 0.0)

        noise_BV = torch.empty_like(probs_BV)
        if len(batch.seeded_rows) < batch.num_rows:
            noise_BV.exponential_()
        for i, generator in zip(batch.seeded_rows, batch.generators):
            noise_BV[i].exponential_(generator=generator)
        # Exp(1) can be 0 in float32; a tiny floor keeps masked tokens at 0 instead of 0/0 = NaN.
        sampled_B = (probs_BV / noise_BV.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)
        return torch.where(batch.greedy_B, greedy_ids_B, sampled_B)


def apply_masks(logits_BV: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """-inf outside the allowed mask and on EOS/stop tokens of rows still under min_tokens."""
    if batch.allowed_token_mask_BV is not None:
        logits_BV = logits_BV.masked_fill(~batch.allowed_token_mask_BV, _NEG_INF)
    if batch.min_tokens_rows_M is not None:
        logits_BV = logits_BV.index_put((batch.min_tokens_rows_M, batch.min_tokens_ids_M),
                                        torch.full((), _NEG_INF, device=logits_BV.device))
    return logits_BV


def apply_penalties(logits_BV: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt and output), then frequency and presence (output only), as in vLLM:
    logit / r if logit > 0 else logit * r;  logit - frequency * count - presence * (count > 0)."""
    B, V = logits_BV.shape
    counts_BV = torch.zeros(B, V + 1, dtype=logits_BV.dtype, device=logits_BV.device)
    counts_BV.scatter_add_(1, batch.output_ids_BL, torch.ones_like(batch.output_ids_BL, dtype=logits_BV.dtype))
    counts_BV = counts_BV[:, :V]
    output_mask_BV = counts_BV > 0
    if batch.repetition_penalty_B is not None:
        seen_BV = torch.zeros(B, V + 1, dtype=torch.bool, device=logits_BV.device)
        seen_BV.scatter_(1, batch.prompt_ids_BL, True)
        seen_BV = seen_BV[:, :V] | output_mask_BV
        r_B1 = batch.repetition_penalty_B.unsqueeze(1)
        penalized_BV = torch.where(logits_BV > 0, logits_BV / r_B1, logits_BV * r_B1)
        logits_BV = torch.where(seen_BV, penalized_BV, logits_BV)
    return (logits_BV - batch.frequency_penalty_B.unsqueeze(1) * counts_BV
            - batch.presence_penalty_B.unsqueeze(1) * output_mask_BV)


def apply_top_k_top_p(logits_BV: torch.Tensor, top_k_B: torch.Tensor | None, top_p_B: torch.Tensor | None,
                      max_top_k: int) -> torch.Tensor:
    """Logits outside each row's top-k, then outside its nucleus of mass top_p, set to -inf.
    Ties at the k-th value are kept; the most likely token always is."""
    V = logits_BV.shape[1]
    if top_p_B is None and top_k_B is not None and max_top_k < V:
        # top-k alone: the k-th largest value from topk(max_k), no full sort.
        values_BK = logits_BV.topk(max_top_k, dim=-1).values
        kth_B1 = values_BK.gather(1, (top_k_B.clamp(max=max_top_k) - 1).unsqueeze(1))
        return logits_BV.masked_fill(logits_BV < kth_B1, _NEG_INF)

    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=False)
    if top_k_B is not None:
        kth_B1 = sorted_BV.gather(1, (V - top_k_B).unsqueeze(1))
        sorted_BV = sorted_BV.masked_fill(sorted_BV < kth_B1, _NEG_INF)
    if top_p_B is not None:
        cumulative_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        drop_BV = cumulative_BV <= 1.0 - top_p_B.unsqueeze(1)
        drop_BV[:, -1] = False
        sorted_BV = sorted_BV.masked_fill(drop_BV, _NEG_INF)
    return torch.empty_like(logits_BV).scatter_(1, order_BV, sorted_BV)


def _with_logprobs(token_ids_B: torch.Tensor, raw_logprobs_BV: torch.Tensor | None,
                   num_logprobs: int | None) -> SamplerOutput:
    if raw_logprobs_BV is None or num_logprobs is None:
        return SamplerOutput(token_ids_B, None, None, None)
    logprobs_B = raw_logprobs_BV.gather(1, token_ids_B.unsqueeze(1)).squeeze(1)
    top_logprobs_BN, top_ids_BN = raw_logprobs_BV.topk(num_logprobs, dim=-1, sorted=True)
    return SamplerOutput(token_ids_B, logprobs_B, top_ids_BN, top_logprobs_BN)
