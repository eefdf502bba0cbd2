"""The OpenAI serving layer: one request in, an OpenAI response (or a stream of chunks) out.

Transport-free: HTTP (`http.py`) and gRPC (`grpc_server.py`) both call `OpenAIServing`, so a
chat behaves the same on either. One chat request:

    validate (model, tools, tool_choice, tool messages) → chat template → token ids
      → limits (max_model_len, max_tokens, n) → SamplingParams (guided decoding, thinking budget)
      → engine client stream ─▶ per choice: ReasoningParser ─content─▶ ToolCallParser
      → response, or chunks (role first, then reasoning/content/tool-call deltas, finish, usage)

Every refusal is an `APIError` (status, OpenAI error fields) raised before the engine sees the
request. The engine client is anything with `generate(request_id, prompt_token_ids, params,
prompt)` (an async iterator of lists of `RequestOutput`), `stats()`, `expert_load()` and
`heartbeat()`: the in-process `AsyncEngine`, or the Ray Serve model deployment's handle
(`serve_app.py`). An engine that is gone (`EngineDeadError`) is a 503 `engine_unavailable`.

Validation, the chat template and tokenization run on a small thread pool, never on the event
loop: a prompt of megabytes takes seconds to tokenize, and the loop meanwhile serves `/health`,
other streams and gRPC.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from expertmesh.engine.async_engine import EngineDeadError, merge_outputs
from expertmesh.engine.outputs import RequestOutput
from expertmesh.engine.parsers import ParsedDelta, ReasoningParser, ToolCall, ToolCallParser
from expertmesh.engine.sampling_params import GuidedDecodingParams, SamplingParams, ToolCallConstraint
from expertmesh.gateway.engine_client import (  # noqa: F401  (re-exported: the serving layer's interface)
    EngineClient,
    LocalEngineClient,
    TokenLimiter,
    expert_load_lists,
)
from expertmesh.gateway.metrics import Metrics, current_outcome
from expertmesh.gateway.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    _SamplingFields,
    check_request_values,
)
from expertmesh.gateway.serving_util import (
    _all_or_none,
    _call_dict,
    _check_tool_messages,
    _finish_reason,
    _join,
    _last,
    _param_of,
    _prompt_list,
    _starts_in_reasoning,
    _usage,
    _usage_counts,
)
from expertmesh.model.tokenizer import Tokenizer, check_template_kwargs

MAX_N = 16
MAX_PROMPTS = 256


@dataclass
class ServingSettings:
    model_name: str
    max_model_len: int
    max_n: int = MAX_N
    max_prompts: int = MAX_PROMPTS
    """Most prompts in one completions request (each an engine request of `n` sequences)."""
    model_aliases: tuple[str, ...] = ()
    """Other names accepted in `model` (e.g. the checkpoint's path)."""
    vocab_size: int | None = None
    """The model's vocabulary: token ids in prompts and stop_token_ids must be below it."""
    prepare_threads: int = 2
    """Threads that validate, render and tokenize requests off the event loop."""


@dataclass
class PreparedChat:
    prompt_token_ids: list[int]
    prompt: str
    params: SamplingParams
    tool_names: set[str] | None
    """Tools whose calls are parsed from the output; None when tool calls are not parsed."""
    starts_in_reasoning: bool
    """The prompt leaves the model inside <think> (the output holds only the closing tag)."""
    guided_param: str | None
    """The request field that asked for an output constraint (named in errors)."""


@dataclass
class _Choice:
    """The parsing state of one choice of a streamed chat."""
    reasoning: ReasoningParser
    tools: ToolCallParser | None
    sent_role: bool = False
    calls: list[ToolCall] = field(default_factory=list)
    num_tokens: int = 0
    finished: bool = False


class OpenAIServing:
    def __init__(self, client: EngineClient, tokenizer: Tokenizer, settings: ServingSettings,
                 metrics: Metrics | None = None) -> None:
        self.client, self.tokenizer, self.settings = client, tokenizer, settings
        self.metrics = metrics or Metrics()
        self.created = int(time.time())
        self.limiter: TokenLimiter | None = None
        """Reserves each engine request's most tokens (prompt + max_tokens x n) before it starts and
        settles them to the prompt plus generated tokens when it ends (per-key token limits)."""
        self._prepare_pool = ThreadPoolExecutor(settings.prepare_threads, thread_name_prefix="expertmesh-prepare")

    async def _off_loop(self, fn, *args):
        """fn(*args) on the prepare pool (templates and tokenization), awaited without blocking the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    # ---- models ----------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    def model(self, name: str) -> dict[str, Any]:
        self._check_model(name, param=None)
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "expertmesh",
                "max_model_len": self.settings.max_model_len}

    def _check_model(self, name: str | None, param: str | None = "model") -> None:
        if name is None or name == self.settings.model_name or name in self.settings.model_aliases:
            return
        shown = name if len(name) <= 100 else name[:97] + "..."
        raise APIError(f"The model `{shown}` does not exist; this server serves `{self.settings.model_name}`.",
                       status=404, type="not_found_error", param=param, code="model_not_found")

    async def engine_stats(self) -> tuple[dict[str, float], dict | list[list[float]] | None]:
        return await self.client.stats(), await self.client.expert_load()

    def replica_stats(self) -> dict[str, dict[str, float]]:
        """Each engine replica's counters by replica id, where the client reaches several (Ray Serve's)."""
        replicas = getattr(self.client, "replica_stats", None)
        return {r.replica_id: dict(r.stats) for r in replicas()} if replicas is not None else {}

    # ---- chat ------------------------------------------------------------------------------

    def prepare_chat(self, req: ChatCompletionRequest) -> PreparedChat:
        """Validate and render a chat (raises APIError naming the problem)."""
        check_request_values(req)
        self._check_model(req.model)
        tools = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools or []]
        tool_names = [t["function"]["name"] for t in tools]
        if len(set(tool_names)) != len(tool_names):
            raise APIError("tools must have distinct function names", param="tools")
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        named = None
        if not isinstance(choice, str):
            named = choice.function.name
            if named not in tool_names:
                raise APIError(f"tool_choice names the function {named!r}, which is not among the tools "
                               f"({', '.join(tool_names) or 'none given'})", param="tool_choice")
        elif choice == "required" and not tools:
            raise APIError("tool_choice is 'required' but no tools were given", param="tool_choice")
        _check_tool_messages(req.messages)

        kwargs = dict(req.chat_template_kwargs or {})
        try:
            check_template_kwargs(kwargs)
        except ValueError as exc:
            raise APIError(str(exc), param="chat_template_kwargs") from None
        kwargs.setdefault("enable_thinking", True)
        try:
            prompt = self.tokenizer.apply_chat_template(
                req.messages, tools=tools if tools and choice != "none" else None,
                add_generation_prompt=req.add_generation_prompt, **kwargs)
        except ValueError as exc:
            raise APIError(str(exc), param="messages") from None
        ids = self.tokenizer.encode(prompt)

        guided_param, guided = self._guided(req)
        if choice == "required" or named is not None:
            if guided is not None:
                raise APIError("tool_choice 'required' or a named function cannot be combined with "
                               "response_format or guided decoding", param="tool_choice")
            specs = [{"name": t["function"]["name"], "parameters": t["function"].get("parameters") or {}}
                     for t in tools]
            guided_param, guided = "tools", GuidedDecodingParams(tool_calls=ToolCallConstraint(
                specs, "named" if named else "required", named))
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._params(req, ids, max_tokens, guided,
                              logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                              thinking_budget=req.thinking_budget, reasoning=True, guided_param=guided_param)
        parse_tools = set(tool_names) if tools and choice != "none" else None
        return PreparedChat(ids, prompt, params, parse_tools, _starts_in_reasoning(prompt), guided_param)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        p = await self._off_loop(self.prepare_chat, req)
        ids, params, tool_names, in_reasoning = p.prompt_token_ids, p.params, p.tool_names, p.starts_in_reasoning
        request_id = f"chatcmpl-{secrets.token_hex(12)}"
        stream = self._run("chat", request_id, ids, p.prompt, params, p.guided_param)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._chat_stream(request_id, stream, params, tool_names, in_reasoning, include_usage, len(ids))
        final = await _last(stream)
        choices = []
        for out in final.outputs:
            reasoning_parser, truncated = ReasoningParser(in_reasoning), out.finish_reason == "length"
            parsed = _join(reasoning_parser.feed(out.text), reasoning_parser.finish(truncated))
            content, calls = parsed.content, []
            if tool_names is not None:
                tool_parser = ToolCallParser(tool_names)
                first, last = tool_parser.feed(content), tool_parser.finish(truncated)
                content, calls = first.content + last.content, [*first.calls, *last.calls]
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None,
                                       "reasoning_content": parsed.reasoning or None}
            if calls:
                message["tool_calls"] = [_call_dict(c) for c in calls]
            choices.append({"index": out.index, "message": message,
                            "logprobs": self._chat_logprobs(out.logprobs, out.token_ids, params.logprobs)
                            if params.logprobs is not None
                            else None,
                            "finish_reason": _finish_reason(out, bool(calls)), "stop_reason": out.stop_reason})
        return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
                "model": self.settings.model_name, "choices": choices, "usage": _usage(final)}

    async def _chat_stream(self, request_id: str, stream: AsyncIterator[RequestOutput], params: SamplingParams,
                           tool_names: set[str] | None, in_reasoning: bool, include_usage: bool,
                           num_prompt: int) -> AsyncIterator[dict[str, Any]]:
        created, model = int(time.time()), self.settings.model_name
        states = [_Choice(ReasoningParser(in_reasoning), ToolCallParser(tool_names) if tool_names is not None else None)
                  for _ in range(params.n)]

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs=None, **extra) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                                 **extra}]}

        last: RequestOutput | None = None
        async for out in stream:
            last = out
            for c in out.outputs:
                st = states[c.index]
                if not st.sent_role:
                    st.sent_role = True
                    yield chunk(c.index, {"role": "assistant", "content": ""})
                st.num_tokens += len(c.token_ids_delta)
                parsed = st.reasoning.feed(c.text_delta)
                truncated = c.finish_reason == "length"
                if c.finished:
                    parsed = _join(parsed, st.reasoning.finish(truncated))
                delta = self._delta(st, parsed, c.finished, truncated)
                logprobs = (self._chat_logprobs(c.logprobs_delta, c.token_ids_delta, params.logprobs)
                            if params.logprobs is not None and c.token_ids_delta else None)
                if delta or logprobs:
                    yield chunk(c.index, delta or {"content": ""}, logprobs=logprobs)
                if c.finished:
                    if c.finish_reason == "error":
                        raise APIError(c.error or "the engine failed this request", status=500, type="server_error")
                    yield chunk(c.index, {}, _finish_reason(c, bool(st.calls)), stop_reason=c.stop_reason)
        if include_usage and last is not None:
            completion = sum(st.num_tokens for st in states)
            yield {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": _usage_counts(num_prompt, completion, last.num_cached_tokens)}

    @staticmethod
    def _delta(st: _Choice, parsed: ParsedDelta, finished: bool, truncated: bool = False) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if parsed.reasoning:
            delta["reasoning_content"] = parsed.reasoning
        content = parsed.content
        if st.tools is not None:
            outs = [st.tools.feed(content)] + ([st.tools.finish(truncated)] if finished else [])
            content = "".join(o.content for o in outs)
            calls = [c for o in outs for c in o.calls]
            if calls:
                delta["tool_calls"] = [{"index": c.index, **_call_dict(c)} for c in calls]
                st.calls.extend(calls)
        if content:
            delta["content"] = content
        return delta

    def _chat_logprobs(self, entries: list[dict[int, float]] | None, token_ids: list[int],
                       num_top: int) -> dict[str, Any] | None:
        """OpenAI's chat logprobs: per token its logprob and the num_top most likely tokens."""
        if entries is None:
            return None
        content = []
        for token_id, entry in zip(token_ids, entries):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:num_top]
            content.append({**self._token_logprob(token_id, entry[token_id]),
                            "top_logprobs": [self._token_logprob(t, lp) for t, lp in top]})
        return {"content": content}

    def _token_logprob(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    # ---- completions -----------------------------------------------------------------------

    def prepare_completion(self, req: CompletionRequest) -> tuple[list[tuple[list[int], str | None]], SamplingParams,
                                                                  str | None]:
        check_request_values(req)
        self._check_model(req.model)
        if req.suffix is not None:
            raise APIError("suffix is not supported: Qwen3 models have no fill-in-the-middle format", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError("best_of must equal n (or be left out): every sampled completion is returned",
                           param="best_of")
        prompts = _prompt_list(req.prompt)
        if len(prompts) > self.settings.max_prompts:  # before any of them is tokenized
            raise APIError(f"prompt holds {len(prompts)} prompts, over the limit of {self.settings.max_prompts} per "
                           "request (max_prompts); send them in several requests", param="prompt",
                           code="too_many_prompts")
        encoded = []
        for p in prompts:
            encoded.append((self.tokenizer.encode(p), p) if isinstance(p, str) else (list(p), None))
        guided_param, guided = self._guided(req)
        params = None
        for ids, _ in encoded:
            params = self._params(req, ids, req.max_tokens, guided, logprobs=req.logprobs,
                                  thinking_budget=None, reasoning=False, guided_param=guided_param)
        return encoded, params, guided_param

    async def completion(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        encoded, params, guided_param = await self._off_loop(self.prepare_completion, req)
        request_id = f"cmpl-{secrets.token_hex(12)}"
        streams = [self._run("completions", f"{request_id}-{i}", ids, text, params, guided_param)
                   for i, (ids, text) in enumerate(encoded)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._completion_stream(request_id, streams, encoded, params, req.echo, include_usage)
        finals = await _all_or_none(*(_last(s) for s in streams))
        choices, prompt_tokens, completion_tokens, cached = [], 0, 0, 0
        for p_index, ((ids, text), final) in enumerate(zip(encoded, finals)):
            prompt_tokens += len(ids)
            cached += final.num_cached_tokens
            for out in final.outputs:
                completion_tokens += len(out.token_ids)
                echo = self._prompt_text(ids, text) if req.echo else ""
                choices.append({
                    "index": p_index * params.n + out.index, "text": echo + out.text,
                    "logprobs": self._completion_logprobs(out.logprobs, out.token_ids, len(echo), params.logprobs)
                    if params.logprobs is not None else None,
                    "finish_reason": _finish_reason(out, False), "stop_reason": out.stop_reason})
        return {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": self.settings.model_name, "choices": choices,
                "usage": _usage_counts(prompt_tokens, completion_tokens, cached)}

    async def _completion_stream(self, request_id: str, streams: list[AsyncIterator[RequestOutput]],
                                 encoded: list[tuple[list[int], str | None]], params: SamplingParams, echo: bool,
                                 include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        created, model = int(time.time()), self.settings.model_name
        merged: asyncio.Queue = asyncio.Queue()
        sentinel = object()

        async def pump(p_index: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    await merged.put((p_index, out))
            except BaseException as exc:
                await merged.put((p_index, exc))
                raise
            finally:
                await merged.put((p_index, sentinel))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            done, num_tokens, cached = 0, {}, 0
            echoed: set[int] = set()
            offsets: dict[int, int] = {}
            while done < len(tasks):
                p_index, item = await merged.get()
                if item is sentinel:
                    done += 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    cached += item.num_cached_tokens
                for c in item.outputs:
                    index = p_index * params.n + c.index
                    text = c.text_delta
                    if echo and index not in echoed:
                        echoed.add(index)
                        text = self._prompt_text(*encoded[p_index]) + text
                    num_tokens[index] = num_tokens.get(index, 0) + len(c.token_ids_delta)
                    logprobs = None
                    if params.logprobs is not None and c.token_ids_delta:
                        logprobs = self._completion_logprobs(c.logprobs_delta, c.token_ids_delta,
                                                             offsets.get(index, 0), params.logprobs)
                    offsets[index] = offsets.get(index, 0) + len(text)
                    if text or logprobs:
                        yield {"id": request_id, "object": "text_completion", "created": created, "model": model,
                               "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                            "finish_reason": None}]}
                    if c.finished:
                        if c.finish_reason == "error":
                            raise APIError(c.error or "the engine failed this request", status=500,
                                           type="server_error")
                        yield {"id": request_id, "object": "text_completion", "created": created, "model": model,
                               "choices": [{"index": index, "text": "", "logprobs": None,
                                            "finish_reason": _finish_reason(c, False),
                                            "stop_reason": c.stop_reason}]}
            if include_usage:
                prompt_tokens = sum(len(ids) for ids, _ in encoded)
                yield {"id": request_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": _usage_counts(prompt_tokens, sum(num_tokens.values()), cached)}
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                await s.aclose()

    def _prompt_text(self, ids: list[int], text: str | None) -> str:
        return text if text is not None else self.tokenizer.decode(ids, skip_special_tokens=False)

    def _completion_logprobs(self, entries: list[dict[int, float]] | None, token_ids: list[int],
                             offset: int, num_top: int) -> dict[str, Any] | None:
        if entries is None:
            return None
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            tokens.append(text)
            token_logprobs.append(max(entry[token_id], -9999.0))
            top_logprobs.append({self.tokenizer.decode([t], skip_special_tokens=False): max(lp, -9999.0)
                                 for t, lp in sorted(entry.items(), key=lambda kv: -kv[1])[:max(num_top, 1)]})
            text_offset.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}

    # ---- shared ----------------------------------------------------------------------------

    def _guided(self, req: _SamplingFields) -> tuple[str | None, GuidedDecodingParams | None]:
        """The request's one output constraint and the field that asked for it."""
        chosen: list[tuple[str, dict[str, Any]]] = []
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            chosen.append(("response_format", {"json_object": True}))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError("response_format of type json_schema needs json_schema.schema",
                               param="response_format")
            chosen.append(("response_format", {"json": fmt.json_schema.schema_}))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(req, name)
            if value is not None:
                chosen.append((name, {key: value}))
        if len(chosen) > 1:
            raise APIError(f"only one kind of guided decoding per request; got {', '.join(n for n, _ in chosen)}",
                           param=chosen[1][0])
        if not chosen:
            return None, None
        param, kwargs = chosen[0]
        try:
            return param, GuidedDecodingParams(**kwargs)
        except ValueError as exc:
            raise APIError(f"{param}: {exc}", param=param) from None

    def _params(self, req: _SamplingFields, ids: list[int], max_tokens: int | None,
                guided: GuidedDecodingParams | None, *, logprobs: int | None, thinking_budget: int | None,
                reasoning: bool, guided_param: str | None) -> SamplingParams:
        if req.logit_bias:
            raise APIError("logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        limit = self.settings.max_model_len
        if not ids:
            raise APIError("the prompt is empty: it needs at least one token", param="prompt"
                           if isinstance(req, CompletionRequest) else "messages")
        if len(ids) >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, your prompt is "
                           f"{len(ids)} tokens (no room for any completion).",
                           param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        room = limit - len(ids)
        max_param = ("max_completion_tokens" if isinstance(req, ChatCompletionRequest)
                     and req.max_completion_tokens is not None else "max_tokens")
        if max_tokens is None:
            max_tokens = room
        elif isinstance(max_tokens, int) and max_tokens > room:
            raise APIError(f"{max_param} is too large: {max_tokens} tokens requested, but the prompt is "
                           f"{len(ids)} tokens and the model's maximum context length is {limit}, which leaves "
                           f"{room}.", param=max_param, code="context_length_exceeded")
        vocab = self.settings.vocab_size
        if vocab is not None:
            bad = [t for t in [*ids, *(req.stop_token_ids or [])] if not 0 <= t < vocab]
            if bad:
                where = "stop_token_ids" if set(bad) & set(req.stop_token_ids or []) else "prompt"
                raise APIError(f"token ids must be in [0, {vocab}); got {bad[:5]}", param=where)
        if req.n > self.settings.max_n:
            raise APIError(f"n must be at most {self.settings.max_n}, got {req.n}", param="n")
        if vocab is not None and req.top_k is not None and req.top_k > vocab:
            raise APIError(f"top_k must be at most the vocabulary size ({vocab}), got {req.top_k}", param="top_k")
        if thinking_budget is not None and thinking_budget > limit:
            raise APIError(f"thinking_budget must be at most the model's maximum context length ({limit}), "
                           f"got {thinking_budget}", param="thinking_budget")
        fields = dict(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed, stop=req.stop or [], stop_token_ids=req.stop_token_ids or [],
            max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs, ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
            guided_decoding=guided, thinking_budget=thinking_budget, reasoning=reasoning)
        try:
            params = SamplingParams(**fields)
        except ValueError as exc:
            raise APIError(str(exc), param=_param_of(str(exc), max_param, guided_param,
                                                     chat=isinstance(req, ChatCompletionRequest))) from None
        return params

    async def _run(self, endpoint: str, request_id: str, ids: list[int], prompt: str | None,
                   params: SamplingParams, guided_param: str | None) -> AsyncIterator[RequestOutput]:
        """The engine's stream of one request, merged per message, with metrics recorded."""
        m = self.metrics
        arrival = time.perf_counter()
        first = last_token = None
        status, generated = "200", 0
        stream = reservation = None
        try:
            if self.limiter is not None:
                reservation = await self.limiter.reserve(len(ids) + params.max_tokens * params.n)
            stream = self.client.generate(request_id, ids, params, prompt)
            async for batch in stream:
                out = merge_outputs(batch)
                now = time.perf_counter()
                new = sum(len(c.token_ids_delta) for c in out.outputs)
                if new:
                    if first is None:
                        first = now
                        m.ttft.observe(now - arrival)
                    elif last_token is not None:
                        m.itl.observe((now - last_token) / new)
                    last_token = now
                    generated += new
                    m.generation_tokens.inc(new)
                yield out
        except EngineDeadError as exc:  # the engine (replica) is gone: the request cannot finish there
            status = "503"
            raise APIError(f"The engine serving this request is unavailable: {exc}", status=503, type="server_error",
                           code="engine_unavailable") from None
        except ValueError as exc:  # refused by the engine (e.g. a grammar that does not compile)
            status = "400"
            raise APIError(str(exc), param=_param_of(str(exc), "max_tokens", guided_param)) from None
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"  # the client went away
            raise
        except APIError as exc:
            status = str(exc.status)
            raise
        except Exception:
            status = "500"
            raise
        finally:
            if stream is not None:
                await stream.aclose()
            outcome = current_outcome.get()
            if outcome is not None:
                outcome.report(status)  # the transport counts the request once, with this status
            else:
                m.count_request(endpoint, status)
            if status == "200":
                m.prompt_tokens.inc(len(ids))
                m.e2e.observe(time.perf_counter() - arrival)
            if reservation is not None:
                # the prompt counts once the engine may have read it; shielded: a cancelled
                # request must still give its unused tokens back
                used = len(ids) + generated if generated or status in ("200", "499", "500") else 0
                await asyncio.shield(self.limiter.settle(reservation, used))
