"""`LLM`: the offline Python API, in vLLM's shape.

    llm = LLM(model="path/to/checkpoint")          # or LLM() for the embedded default model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text

It composes the tokenizer, an executor (in-process for ep_size=1) and `EngineCore`, then
drives the engine until the given requests are done.
"""
from __future__ import annotations

import importlib.util
import inspect
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from expertmesh.engine.config import EngineConfig, engine_settings
from expertmesh.engine.core import EngineCore
from expertmesh.engine.executor import InProcessExecutor
from expertmesh.engine.model_files import load_tokenizer, model_dir
from expertmesh.engine.outputs import RequestOutput
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.model.tokenizer import Tokenizer, check_template_kwargs

Prompt = str | list[int]


class LLM:
    """`LLM(model, **kwargs)`: the keyword arguments are the engine's settings, the fields of
    engine/config.py under their public names (`ep_size`, `max_model_len`, `num_kv_blocks`, ...;
    `inspect.signature(LLM)` lists them with their defaults, tests/test_cli.py freezes the list).
    `progress` shows the weights' loading bar."""

    def __init__(self, model: str | Path | None = None, *, progress: bool = True, **kwargs: Any) -> None:
        self.config = EngineConfig.from_kwargs(model=None if model is None else str(model), **kwargs)
        if model is None:  # the default model, made once here
            self.config.load.model = str(model_dir(self.config.load))
        else:  # a repo id is fetched here once, with a progress bar; every process resolves it again
            model_dir(self.config.load)
        self.tokenizer = load_tokenizer(self.config.load)
        if self.config.parallel.ep_size == 1:
            executor = InProcessExecutor(self.config, progress=progress)
        else:
            if importlib.util.find_spec("ray") is None:
                raise ValueError("ep_size > 1 runs on Ray, which is not installed: pip install 'expertmesh[ray]'")
            from expertmesh.cluster.executor import RayExecutor

            executor = RayExecutor(self.config)
        self.engine = EngineCore(self.config, executor, self.tokenizer)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Release the executor's workers (an EP group's actors and GPUs) and the grammar compiler processes."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string, or a list of token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        # every request is checked (its grammar compiled) before any is admitted
        compiled = [self.engine.validate(ids, p) for ids, p in zip(encoded, params)]
        request_ids = []
        for prompt, ids, p, c in zip(prompts, encoded, params, compiled):
            request_id = f"llm-{next(self._ids)}"
            self.engine.add_request(request_id, ids, p, prompt=prompt if isinstance(prompt, str) else None,
                                    stream=False, compiled=c)
            request_ids.append(request_id)
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Chat completion for one conversation (a list of messages) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        check_template_kwargs(chat_template_kwargs or {})
        prompts = [
            self.tokenizer.apply_chat_template(conv, tools=tools, add_generation_prompt=add_generation_prompt,
                                               **(chat_template_kwargs or {}))
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _encode(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise ValueError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")

    @staticmethod
    def _params_per_prompt(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        return params

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        merged: dict[str, dict[int, object]] = {rid: {} for rid in request_ids}
        bar = tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm)
        while len(done) < len(request_ids):
            for out in self.engine.step():
                if out.request_id not in merged:
                    continue
                for completion in out.outputs:
                    merged[out.request_id][completion.index] = completion
                if out.finished:
                    out.outputs = [merged[out.request_id][i] for i in sorted(merged[out.request_id])]
                    done[out.request_id] = out
                    bar.update()
        bar.close()
        return [done[rid] for rid in request_ids]


def _signature() -> inspect.Signature:
    """LLM's signature with every engine setting as a keyword-only parameter, for help() and editors."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                annotation="str | Path | None"),
              inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool")]
    params += [inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=s.default)
               for s in engine_settings() if s.name != "model"]
    return inspect.Signature(params)


LLM.__init__.__signature__ = _signature()
