"""Async scheduling: the next step is scheduled while the one before is on the device, its
samples placeholders until they come back. Whatever the batch does (arrivals, stops, aborts,
preemption, prefix-cache hits, seeds, logprobs, n > 1), the outputs equal the synchronous
engine's; steps whose sampling reads earlier tokens (penalties, grammars) wait instead.

On the CPU the runner computes inside `submit`, so the engine would not overlap there by
itself; these tests switch the overlap on (`overlaps_steps`) to run the same bookkeeping the
GPU runs, and record the executor's calls to show that steps did overlap."""
from __future__ import annotations

import pytest

from expertmesh import LLM, SamplingParams
from expertmesh.engine.sampling_params import GuidedDecodingParams
from expertmesh.engine.scheduler import PLACEHOLDER

PROMPTS = ["The capital of France is", "List three colours:", "1, 2, 3,", "Once upon a time, in a small village",
           "Hi"]
COMMON = dict(device="cpu", dtype="float32", progress=False)


class CallLog:
    """Wraps an executor's submit/collect/execute and records their order."""

    def __init__(self, executor) -> None:
        self.calls: list[str] = []
        self.in_flight_at_start = 0
        for name in ("submit", "collect", "execute"):
            inner = getattr(executor, name)
            setattr(executor, name, self._wrap(name, inner))

    def _wrap(self, name, inner):
        def call(*args):
            self.calls.append(name)
            return inner(*args)
        return call

    def clear(self, engine) -> None:
        """Forget the calls so far (a step of them may still be in flight)."""
        self.calls.clear()
        self.in_flight_at_start = int(engine._in_flight is not None)

    @property
    def overlapped_steps(self) -> int:
        """Steps submitted while an earlier one was still to be collected."""
        in_flight, overlapped = self.in_flight_at_start, 0
        for call in self.calls:
            if call == "submit":
                overlapped += in_flight > 0
                in_flight += 1
            elif call == "collect":
                in_flight -= 1
        return overlapped


def make_llm(path, overlap: bool, **kwargs) -> tuple[LLM, CallLog]:
    llm = LLM(path, **COMMON, **kwargs)
    llm.engine.executor.overlaps_steps = overlap
    return llm, CallLog(llm.engine.executor)


def summary(outs):
    """Tokens, text and stops exactly; logprobs to 1e-5 (a sequence that stops stays in the batch
    one step longer under async scheduling, and a batch of another size rounds float32 sums
    differently in the last bits)."""
    def rounded(logprobs):
        return None if logprobs is None else [{t: round(v, 5) for t, v in entry.items()} for entry in logprobs]
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, rounded(c.logprobs)) for c in o.outputs]
            for o in outs]


def mixed_params(eos_stop: bool = True):
    return [
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=3, n=2, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=not eos_stop),
        SamplingParams(temperature=0.0, max_tokens=1, min_tokens=1, ignore_eos=True),
    ]


@pytest.fixture(scope="module")
def sync_llm(qwen3_moe_path):
    return make_llm(qwen3_moe_path, overlap=False)


@pytest.fixture(scope="module")
def async_llm(qwen3_moe_path):
    return make_llm(qwen3_moe_path, overlap=True)


def test_async_outputs_equal_the_synchronous_engines_and_steps_overlap(sync_llm, async_llm):
    """Greedy and seeded rows, logprobs, n = 2, one-token and 30-token requests in one batch."""
    (ref, ref_log), (fast, log) = sync_llm, async_llm
    expected = summary(ref.generate(PROMPTS, mixed_params()))
    log.clear(fast.engine)
    assert summary(fast.generate(PROMPTS, mixed_params())) == expected
    assert "execute" not in log.calls and log.overlapped_steps >= 5
    assert ref_log.overlapped_steps == 0 and "submit" not in ref_log.calls  # the CPU default stays synchronous
    assert fast.engine.block_manager.num_free_blocks == fast.engine.block_manager.num_blocks  # nothing leaked


def test_stop_strings_and_eos_end_a_sequence_one_step_late_without_its_extra_token(sync_llm, async_llm):
    """A sequence that stops on a step whose successor is already on the device: the successor's
    token for it is dropped, the text and token ids are the synchronous engine's."""
    (ref, _), (fast, _) = sync_llm, async_llm
    greedy = ref.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    # stop on text the greedy run produces, and on a token it samples mid-way
    params = [SamplingParams(temperature=0.0, max_tokens=12, stop=[o.outputs[0].text[3:6]], ignore_eos=True)
              for o in greedy[:2]]
    params += [SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[o.outputs[0].token_ids[4]],
                              ignore_eos=True) for o in greedy[2:]]
    expected = summary(ref.generate(PROMPTS, params))
    assert {o[0][2] for o in expected} == {"stop"}
    assert summary(fast.generate(PROMPTS, params)) == expected


def drive(llm, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]], aborts: dict[int, list[str]]):
    """Step the engine by hand: requests arrive and are aborted before given steps; every final
    output by request id."""
    engine, finals, step = llm.engine, {}, 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for request_id, ids, params in arrivals.get(step, []):
            engine.add_request(request_id, ids, params, stream=False)
        engine.abort(aborts.get(step, []))
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = [(c.token_ids, c.finish_reason) for c in out.outputs]
        step += 1
    return finals


def test_requests_arriving_and_aborted_between_steps(sync_llm, async_llm):
    (ref, _), (fast, log) = sync_llm, async_llm
    tok = ref.get_tokenizer()
    arrivals = {0: [("a", tok.encode(PROMPTS[0]), SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)),
                    ("b", tok.encode(PROMPTS[1]), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))],
                2: [("c", tok.encode(PROMPTS[2]), SamplingParams(temperature=0.7, seed=1, max_tokens=6,
                                                                  ignore_eos=True))],
                5: [("d", tok.encode(PROMPTS[3]), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))]}
    aborts = {7: ["b"]}
    expected = drive(ref, arrivals, aborts)
    log.clear(fast.engine)
    got = drive(fast, arrivals, aborts)
    assert set(got) == {"a", "c", "d"}  # b was aborted: no final output, as in the synchronous engine
    assert got == {k: v for k, v in expected.items() if k != "b"}
    assert log.overlapped_steps >= 5
    bm = fast.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not fast.engine.has_unfinished()


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
def test_an_id_reused_at_once_gets_none_of_the_old_requests_tokens(sync_llm, async_llm, overlap):
    """Abort a request and add another under the same id before the next step: the ranks drop the
    old one before they take the new one (one plan carries both), and under async scheduling the
    step in flight still carries a token for the old one, which must not land in the new one's
    output; the same once a finished batch has left its extra step in flight."""
    ref = sync_llm[0]
    llm = async_llm[0] if overlap else ref
    tok = ref.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    new_ids = tok.encode(PROMPTS[4])
    expected = ref.generate([new_ids], params)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request("r", tok.encode(PROMPTS[0]), SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert (engine._in_flight is not None) == overlap  # under async scheduling a step of "r" is on its way
    engine.abort("r")
    engine.add_request("r", new_ids, params, stream=False)
    assert drive(llm, {}, {}) == {"r": [(expected, "length")]}
    assert (engine._in_flight is not None) == overlap  # the extra step of the finished batch stays in flight ...
    engine.add_request("r", new_ids, params, stream=False)
    assert drive(llm, {}, {}) == {"r": [(expected, "length")]}  # ... and is collected, dropped, here


def test_a_request_aborted_before_any_step_is_never_announced_to_the_ranks(sync_llm):
    """Added and aborted between two steps: the next plan neither adds nor drops it, so the
    ranks hold no state for it (they drop a plan's finished ids before adding its arrivals)."""
    llm = sync_llm[0]
    plans = []
    runner = llm.engine.executor.runner
    inner = runner.submit
    runner.submit = lambda plan: plans.append(plan) or inner(plan)
    try:
        llm.engine.add_request("gone", [1, 2, 3], SamplingParams(max_tokens=2))
        llm.engine.abort("gone")
        llm.engine.add_request("kept", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        llm.engine.step()
    finally:
        runner.submit = inner
    assert [n.request_id for n in plans[0].new_requests] == ["kept"] and "gone" not in plans[0].finished_request_ids
    assert "gone" not in runner.requests
    drive(llm, {}, {})


def test_preemption_and_prefix_cache_hits_under_async_scheduling(qwen3_moe_path):
    """A cache so small that decoding preempts requests (recomputed later), and repeated prompts
    that hit the prefix cache: the outputs equal the synchronous engine's."""
    tight = dict(block_size=4, num_kv_blocks=14, max_num_seqs=4)
    prompts = [PROMPTS[3], PROMPTS[3] + " there", PROMPTS[1], PROMPTS[3]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ref, _ = make_llm(qwen3_moe_path, overlap=False, **tight)
    fast, log = make_llm(qwen3_moe_path, overlap=True, **tight)
    expected = summary(ref.generate(prompts, params))
    outs = fast.generate(prompts, params)
    assert summary(outs) == expected
    assert fast.engine.num_preemptions > 0 and log.overlapped_steps >= 5
    assert fast.engine.block_manager.prefix_cache_hits > 0
    bm = fast.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_penalties_and_grammars_wait_for_the_step_in_flight(sync_llm, async_llm):
    """Sampling that reads the values of earlier tokens (penalties) or masks from a grammar that
    follows them cannot take placeholders: while such a request runs, every step waits for its
    tokens (`execute`); once they have finished, the long request beside them overlaps again."""
    (ref, _), (fast, log) = sync_llm, async_llm
    params = [SamplingParams(temperature=0.0, max_tokens=4, repetition_penalty=1.3, presence_penalty=0.5),
              SamplingParams(temperature=0.0, max_tokens=10,
                             guided_decoding=GuidedDecodingParams(choice=["red", "green", "blue"])),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)]
    expected = summary(ref.generate(PROMPTS[:3], params))
    log.clear(fast.engine)
    assert summary(fast.generate(PROMPTS[:3], params)) == expected
    calls = log.calls[log.in_flight_at_start:]  # the step left in flight by the test before, collected first
    first_submit = calls.index("submit")
    assert first_submit >= 4 and set(calls[:first_submit]) == {"execute"}
    assert "execute" not in calls[first_submit:] and log.overlapped_steps >= 5


def test_the_runner_fills_placeholders_from_the_step_in_flight(qwen3_moe_path):
    """Runner level: two steps submitted before the first is collected; the second's input is the
    first's sample, taken on the device; `execute` with a step in flight is refused."""
    llm, _ = make_llm(qwen3_moe_path, overlap=True)
    runner = llm.engine.executor.runner
    ref, _ = make_llm(qwen3_moe_path, overlap=False)
    want = ref.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    from expertmesh.engine.step import Chunk, NewRequest, RankChunks, StepPlan

    def plan(start, n, new=()):
        return StepPlan(tuple(new), (RankChunks.from_chunks([Chunk("r", start, n, [0], True)]),), ())

    runner.submit(plan(0, 3, [NewRequest("r", [5, 6, 7], SamplingParams(temperature=0.0), frozenset())]))
    assert runner.requests["r"].output_token_ids == [PLACEHOLDER]
    runner.submit(plan(3, 1))
    with pytest.raises(RuntimeError, match="step in flight"):
        runner.execute(plan(4, 1))
    first, second = runner.collect(), runner.collect()
    assert runner.requests["r"].output_token_ids == list(first.token_ids + second.token_ids)
    assert list(first.token_ids + second.token_ids) == want[0].outputs[0].token_ids[:2]



def test_kernel_path_and_graph_replay_take_the_samples_on_the_device(qwen3_moe_path):
    """The kernel path (Triton's interpreter on the CPU; the GPU runs tests/test_gpu.py's twin):
    placeholders filled in the static input buffer the decode graphs read, in the steady state
    by one slice copy, while requests finish and the batch shrinks through the graph ladder."""
    common = dict(max_num_batched_tokens=16, max_num_seqs=4)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (5, 2, 4)]
    ref, _ = make_llm(qwen3_moe_path, overlap=False, kernels="torch", **common)  # the kernels' own oracle
    fast, log = make_llm(qwen3_moe_path, overlap=True, kernels="triton", **common)
    runner = fast.engine.executor.runner
    fills = []
    inner = runner._fill_placeholders
    runner._fill_placeholders = lambda ids, f: fills.extend(f) or inner(ids, f)
    expected = [[c[:4] for c in o] for o in summary(ref.generate(PROMPTS[:3], params))]
    assert [[c[:4] for c in o] for o in summary(fast.generate(PROMPTS[:3], params))] == expected
    assert log.overlapped_steps >= 3
    assert any(f.contiguous for f in fills) and any(not f.contiguous for f in fills)


@pytest.mark.gpu
def test_on_the_gpu_async_scheduling_gives_the_synchronous_tokens(qwen3_moe_path):
    """The GPU default (async scheduling with CUDA graphs) against synchronous steps, float32:
    the mixed batch, and requests arriving and aborted between steps."""
    common = dict(device="cuda", dtype="float32", num_kv_blocks=512, max_num_seqs=8, progress=False)
    ref = LLM(qwen3_moe_path, async_scheduling=False, **common)
    fast = LLM(qwen3_moe_path, **common)
    assert fast.engine.executor.overlaps_steps and fast.engine.executor.runner.graphs.graphs
    log = CallLog(fast.engine.executor)
    assert summary(fast.generate(PROMPTS, mixed_params())) == summary(ref.generate(PROMPTS, mixed_params()))
    assert log.overlapped_steps >= 5 and "execute" not in log.calls
    tok = ref.get_tokenizer()
    arrivals = {0: [("a", tok.encode(PROMPTS[0]), SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)),
                    ("b", tok.encode(PROMPTS[1]), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))],
                3: [("c", tok.encode(PROMPTS[2]), SamplingParams(temperature=0.7, seed=1, max_tokens=6,
                                                                  ignore_eos=True))]}
    assert drive(fast, arrivals, {6: ["b"]}) == drive(ref, arrivals, {6: ["b"]})
    bm = fast.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_step_that_fails_to_launch_ends_its_requests_and_the_engine_goes_on(sync_llm, async_llm):
    """A submit that raises (the step in flight before it is still collected): that step's requests
    end with finish_reason "error", no block leaks, and the next requests run as usual."""
    (ref, _), (fast, _) = sync_llm, async_llm
    executor = fast.engine.executor
    submit, calls = executor.submit, {"n": 0}

    def fail_third(plan):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("launch exploded")
        return submit(plan)

    executor.submit = fail_third
    try:
        outs = fast.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    finally:
        executor.submit = submit
    assert {o.outputs[0].finish_reason for o in outs} == {"error"}
    assert all("launch exploded" in o.outputs[0].error for o in outs)
    bm = fast.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    assert summary(fast.generate(PROMPTS[:2], params)) == summary(ref.generate(PROMPTS[:2], params))
