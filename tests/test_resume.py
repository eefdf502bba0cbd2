"""Requests resume on a fresh group when their group's workers die (EngineCore._fail_all): a
deterministic executor stands for a greedy model (each token a function of the whole context,
so a resumed sequence gives the undisturbed tokens only if its context came back exactly), and
dies at chosen steps. Streams go on without an error, with the undisturbed tokens and text, stop
strings and grammars included; past `max_resumptions` the request ends with a clear error."""
from __future__ import annotations

import pytest

from expertmesh.engine.config import CacheConfig, EngineConfig, ModelLoadConfig, ParallelConfig, SchedulerConfig
from expertmesh.engine.core import EngineCore
from expertmesh.engine.executor import ExecutorDiedError
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.step import StepResult
from expertmesh.model.config import ModelConfig
from expertmesh.model.tokenizer import Tokenizer


class GreedyStandIn:
    """Token = a hash of the whole context; the group 'dies' at the steps in `deaths`."""

    def __init__(self, model_config, num_blocks, num_ranks, deaths=()):
        self.model_config, self.num_blocks, self.num_ranks = model_config, num_blocks, num_ranks
        self.deaths, self.steps, self.restarts = set(deaths), 0, 0
        self.context: dict[str, list[int]] = {}

    def execute(self, plan):
        self.steps += 1
        if self.steps in self.deaths:
            raise ExecutorDiedError("rank 1 of the EP group died")
        for rid in plan.finished_request_ids:
            self.context.pop(rid, None)
        for new in plan.new_requests:
            self.context[new.request_id] = list(new.prompt_token_ids) + list(new.output_token_ids)
        ids, tokens = [], []
        masks = {rid: row for m in plan.token_masks if m is not None for rid, row in zip(m.request_ids, m.bitmask)}
        chunks = [c for rank in plan.chunks_by_rank for c in rank] + list(plan.sharded)
        for c in chunks:
            if c.sample:
                context = self.context[c.request_id]
                assert c.start + c.num_tokens == len(context), "the step does not reach the context's end"
                token = 100 + (sum(t * (i + 1) for i, t in enumerate(context[-8:])) + len(context)) % 600
                if c.request_id in masks:  # a grammar's mask: the allowed token the hash picks
                    row = masks[c.request_id]
                    allowed = [t for t in range(len(row) * 32) if (int(row[t // 32]) >> (t % 32)) & 1]
                    token = allowed[token % len(allowed)]
                context.append(token)
                ids.append(c.request_id)
                tokens.append(token)
        return StepResult(tuple(ids), tuple(tokens))

    def restart(self):
        self.restarts += 1
        self.context.clear()  # fresh workers remember nothing

    def expert_load(self):
        return None

    def shutdown(self):
        pass


def make(path, deaths=(), world=2, max_resumptions=3, threshold=0):
    config = EngineConfig(load=ModelLoadConfig(str(path), device="cpu"),
                          cache=CacheConfig(block_size=4, num_blocks=128),
                          scheduler=SchedulerConfig(max_num_batched_tokens=32),
                          parallel=ParallelConfig(max_resumptions=max_resumptions,
                                                  sequence_parallel_min_tokens=threshold))
    executor = GreedyStandIn(ModelConfig.from_pretrained(path), 128, world, deaths)
    return EngineCore(config, executor, Tokenizer.from_pretrained(path))


def run(core, requests):
    """Add (id, prompt, params), step to the end: each completion's (token ids, text, finish reason,
    error), and its streamed deltas' text joined (what a client saw)."""
    for rid, prompt, params in requests:
        core.add_request(rid, prompt, params)
    final, streamed = {}, {}
    while core.has_unfinished():
        for out in core.step():
            for o in out.outputs:  # n > 1: each completion streams its own deltas
                streamed[out.request_id, o.index] = streamed.get((out.request_id, o.index), "") + o.text_delta
                if o.finish_reason is not None:
                    final[out.request_id if o.index == 0 else f"{out.request_id}#{o.index}"] = (
                        o.token_ids, o.text, o.finish_reason, o.error)
    return final, streamed


REQUESTS = [("a", list(range(1, 40)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
            ("b", list(range(50, 60)), SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, n=2)),
            ("long", [i % 500 for i in range(150)], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))]


@pytest.mark.parametrize("deaths", [(3,), (2, 9, 10)], ids=["once", "three-times"])
@pytest.mark.parametrize("threshold", [0, 100], ids=["ordinary", "sharded"])
def test_streams_resume_with_the_undisturbed_tokens(qwen3_moe_path, deaths, threshold):
    want, want_streamed = run(make(qwen3_moe_path, threshold=threshold), REQUESTS)
    core = make(qwen3_moe_path, deaths, threshold=threshold)
    got, streamed = run(core, REQUESTS)
    assert got == want and streamed == want_streamed
    assert all(reason == "length" for _, _, reason, _ in got.values())
    assert core.executor.restarts == len(deaths) and core.stats()["num_resumptions"] >= len(deaths)
    assert core.stats()["num_free_blocks"] == core.stats()["num_blocks"]


def test_stop_strings_and_grammars_go_on_across_a_resumption(qwen3_moe_path):
    """The stop checker's and the grammar's state stay in the core: a stop string is found where the
    undisturbed run finds it, and a guided choice still completes."""
    from expertmesh.engine.sampling_params import GuidedDecodingParams

    stop = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want, _ = run(make(qwen3_moe_path), [("s", list(range(1, 30)), stop)])
    text = want["s"][1]
    cut = text[len(text) // 2: len(text) // 2 + 3]
    requests = [("s", list(range(1, 30)), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[cut])),
                ("g", list(range(5, 15)), SamplingParams(temperature=0, max_tokens=20,
                                                         guided_decoding=GuidedDecodingParams(choice=["yes", "no"])))]
    want, _ = run(make(qwen3_moe_path), requests)
    got, _ = run(make(qwen3_moe_path, deaths=(4,)), requests)
    assert got == want and got["s"][2] == "stop" and got["g"][1] in ("yes", "no")


@pytest.mark.parametrize("bad", [-1, 1.5, "three", None, 10**30 * -1])
def test_max_resumptions_refuses_what_is_not_a_count(qwen3_moe_path, bad):
    from pydantic import ValidationError

    from expertmesh.gateway.app_config import AppConfig

    with pytest.raises(ValidationError, match="max_resumptions"):  # a served app's setting
        AppConfig.model_validate({"model": str(qwen3_moe_path), "max_resumptions": bad})
    if isinstance(bad, int):
        with pytest.raises(ValueError, match="max_resumptions must be >= 0"):
            ParallelConfig(max_resumptions=bad)


def test_past_max_resumptions_the_request_ends_with_a_clear_error(qwen3_moe_path):
    core = make(qwen3_moe_path, deaths=(2, 3, 4), max_resumptions=2)
    got, _ = run(core, REQUESTS[:1])
    _, _, reason, error = got["a"]
    assert reason == "error" and "rank 1 of the EP group died" in error and "max_resumptions" in error
    later, _ = run(core, REQUESTS[:1])  # the engine goes on
    assert later["a"][2] == "length"


def _stream_for(core, rid, prompt, params, steps):
    """Run a request for `steps` steps (or to its end): its streamed tokens and text so far."""
    core.add_request(rid, prompt, params)
    tokens, text = [], ""
    for _ in range(steps):
        for out in core.step():
            tokens += out.outputs[0].token_ids_delta
            text += out.outputs[0].text_delta
    return tokens, text


@pytest.mark.parametrize("steps", [2, 5, 9])
@pytest.mark.parametrize("kind", ["plain", "stop", "choice"])
def test_a_request_resumed_on_another_engine_goes_on_as_if_nothing_happened(qwen3_moe_path, steps, kind):
    """What the gateway does when an engine replica dies: the request starts again on another
    engine with `Resume(tokens, text it streamed)`; the client's stream (text and tokens joined
    across both engines) and the final totals equal an undisturbed run's."""
    from expertmesh.engine.core import Resume
    from expertmesh.engine.sampling_params import GuidedDecodingParams

    prompt = list(range(1, 30))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    if kind != "plain":
        want, _ = run(make(qwen3_moe_path), [("r", prompt, params)])
        text = want["r"][1]
        params = (SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[text[20:23]]) if kind == "stop"
                  else SamplingParams(temperature=0, max_tokens=40,
                                      guided_decoding=GuidedDecodingParams(regex=r"[a-z ]{10,30}\.")))
    (want,), _ = run(make(qwen3_moe_path), [("r", prompt, params)])[0].values(), None
    tokens, text = _stream_for(make(qwen3_moe_path), "r", prompt, params, steps)
    other = make(qwen3_moe_path)
    other.add_request("r", prompt, params, resume=Resume(tuple(tokens), text))
    final = None
    while other.has_unfinished():
        for out in other.step():
            tokens += out.outputs[0].token_ids_delta
            text += out.outputs[0].text_delta
            final = out.outputs[0]
    assert (tokens, text) == (want[0], want[1])
    assert (final.token_ids, final.text, final.finish_reason) == want[:3]


def test_a_resume_that_does_not_fit_the_request_is_refused_and_leaves_nothing(qwen3_moe_path):
    from expertmesh.engine.core import Resume
    from expertmesh.engine.sampling_params import GuidedDecodingParams

    core = make(qwen3_moe_path)
    greedy = SamplingParams(temperature=0, max_tokens=5)
    cases = [(Resume((1, 2, 3, 4, 5)), greedy, "max_tokens"), (Resume((10**7,)), greedy, "token ids"),
             (Resume((5,), "not the text of the tokens"), greedy, "text"),
             (Resume((5,)), SamplingParams(temperature=0, n=2), "n = 1"),
             (Resume((5, 5, 5)), SamplingParams(temperature=0, max_tokens=9, guided_decoding=GuidedDecodingParams(
                 choice=["yes", "no"])), "grammar")]
    yes = core.tokenizer.encode("yes")  # a resume that already ends the request
    cases += [(Resume(tuple(yes), "yes"), SamplingParams(temperature=0, max_tokens=9, stop=["es"]), "stop string"),
              (Resume((*yes, core.tokenizer.eos_token_ids[0]), "yes"), SamplingParams(
                  temperature=0, max_tokens=9, guided_decoding=GuidedDecodingParams(choice=["yes", "no"])),
               "complete")]
    for resume, params, message in cases:
        with pytest.raises(ValueError, match=message):
            core.add_request("r", [1, 2, 3], params, resume=resume)
        assert not core.has_unfinished() and not core._sequences and not core._guides
    got, _ = run(core, REQUESTS[:1])  # the id is free again, and the engine serves
    assert got["a"][2] == "length"
