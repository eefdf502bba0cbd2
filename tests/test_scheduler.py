"""Scheduler: continuous batching, chunked prefill, preemption, errors. Fabricated model outputs."""
from __future__ import annotations

import random

import pytest

from expertmesh.engine.block_manager import BlockManager
from expertmesh.engine.config import SchedulerConfig
from expertmesh.engine.request import Request, RequestStatus
from expertmesh.engine.sampling_params import SamplingParams
from expertmesh.engine.scheduler import Scheduler, SchedulerOutput


def make_scheduler(num_blocks=64, block_size=4, budget=64, max_num_seqs=16, caching=True, max_model_len=4096):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget), bm, max_model_len)


def make_req(rid: str, prompt_len: int = 8, max_tokens: int = 4, prompt: list[int] | None = None) -> Request:
    prompt = list(prompt) if prompt is not None else [hash((rid, i)) % 1000 for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens))


def fake_token(req: Request) -> int:
    """The model's 'next token': a function of the request and output index only, so a request
    recomputed after preemption must produce the same sequence."""
    return (sum(map(ord, req.request_id)) * 31 + len(req.output_token_ids) * 7) % 997


def step(sched: Scheduler) -> SchedulerOutput:
    """schedule → fabricate samples → update → finish at max_tokens; checks invariants."""
    out = sched.schedule()
    assert all(item.num_tokens >= 1 for item in out.scheduled)
    assert out.num_batched_tokens == sum(item.num_tokens for item in out.scheduled)
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert len(out.scheduled) <= sched.config.max_num_seqs
    sampled = {i.request.request_id: fake_token(i.request) for i in out.scheduled if i.samples}
    sched.update(out, sampled)
    for item in out.scheduled:
        req = item.request
        if item.samples and len(req.output_token_ids) >= req.params.max_tokens:
            sched.finish(req, RequestStatus.FINISHED_LENGTH)
    sched.block_manager.check_invariants(list(sched.running) + list(sched.waiting))
    return out


def chunks(out: SchedulerOutput) -> dict[str, tuple[int, int, bool]]:
    return {i.request.request_id: (i.start, i.num_tokens, i.samples) for i in out.scheduled}


@pytest.mark.parametrize("budget, expected", [
    (1, [(i, 1, i == 19) for i in range(20)]),
    (7, [(0, 7, False), (7, 7, False), (14, 6, True)]),
    (64, [(0, 20, True)]),
])
def test_chunked_prefill_follows_the_budget(budget, expected):
    sched = make_scheduler(budget=budget)
    sched.add_request(make_req("a", prompt_len=20, max_tokens=3))
    got = [chunks(step(sched))["a"] for _ in expected]
    assert got == expected
    assert [chunks(step(sched))["a"] for _ in range(2)] == [(20, 1, True), (21, 1, True)]
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_continuous_batching_new_request_joins_decoding_ones():
    sched = make_scheduler()
    sched.add_request(make_req("a", 8, max_tokens=10))
    sched.add_request(make_req("b", 5, max_tokens=10))
    assert chunks(step(sched)) == {"a": (0, 8, True), "b": (0, 5, True)}
    assert chunks(step(sched)) == {"a": (8, 1, True), "b": (5, 1, True)}
    sched.add_request(make_req("c", 12, max_tokens=10))
    assert chunks(step(sched)) == {"a": (9, 1, True), "b": (6, 1, True), "c": (0, 12, True)}
    assert [r.request_id for r in sched.running] == ["a", "b", "c"]
    while sched.has_unfinished():
        step(sched)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_decode_tokens_share_the_budget_with_prefill_chunks():
    sched = make_scheduler(budget=8)
    sched.add_request(make_req("a", 4, max_tokens=10))
    sched.add_request(make_req("b", 4, max_tokens=10))
    assert chunks(step(sched)) == {"a": (0, 4, True), "b": (0, 4, True)}
    sched.add_request(make_req("c", 20, max_tokens=2))
    assert chunks(step(sched)) == {"a": (4, 1, True), "b": (4, 1, True), "c": (0, 6, False)}
    assert chunks(step(sched)) == {"a": (5, 1, True), "b": (5, 1, True), "c": (6, 6, False)}
    assert chunks(step(sched)) == {"a": (6, 1, True), "b": (6, 1, True), "c": (12, 6, False)}
    out = step(sched)
    assert chunks(out) == {"a": (7, 1, True), "b": (7, 1, True), "c": (18, 2, True)}
    assert out.num_batched_tokens == 4


def test_max_num_seqs_is_honoured():
    sched = make_scheduler(max_num_seqs=2)
    for rid, n in (("a", 2), ("b", 4), ("c", 3)):
        sched.add_request(make_req(rid, 4, max_tokens=n))
    assert set(chunks(step(sched))) == {"a", "b"}
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert set(chunks(step(sched))) == {"a", "b"}  # a finishes after this step
    assert chunks(step(sched)) == {"b": (5, 1, True), "c": (0, 4, True)}
    while sched.has_unfinished():
        assert len(step(sched).scheduled) <= 2


def test_preemption_of_the_request_itself_then_resume():
    sched = make_scheduler(num_blocks=5, block_size=4, caching=False)
    a, b = make_req("a", 8, max_tokens=8), make_req("b", 8, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # both prefill: 4 blocks used, 1 free
    out = step(sched)  # a takes the last block; b cannot grow: b is the last admitted, preempts itself
    assert chunks(out) == {"a": (8, 1, True)} and out.preempted == ("b",)
    assert b.status is RequestStatus.WAITING and b.num_preemptions == 1
    assert b.num_computed_tokens == 0 and b.block_ids == [] and len(b.output_token_ids) == 1
    assert list(sched.waiting) == [b]
    while a in sched.running:
        assert "b" not in chunks(step(sched))  # 4 blocks of a's + 5 of b's do not fit together
    out = step(sched)
    assert chunks(out) == {"b": (0, 9, True)}  # recomputed as prompt + its one output
    while sched.has_unfinished():
        step(sched)
    for req in (a, b):
        assert req.status is RequestStatus.FINISHED_LENGTH
        assert req.output_token_ids == _expected(req)
    assert sched.block_manager.num_free_blocks == 5


def _expected(req: Request) -> list[int]:
    probe = make_req(req.request_id, 0)
    tokens = []
    for _ in range(req.params.max_tokens):
        tokens.append(fake_token(probe))
        probe.output_token_ids.append(tokens[-1])
    return tokens


def test_preemption_is_lifo_and_requeues_at_the_front():
    sched = make_scheduler(num_blocks=7, block_size=4, caching=False, max_num_seqs=3)
    reqs = [make_req(rid, 8, max_tokens=6) for rid in "abcd"]
    for req in reqs:
        sched.add_request(req)
    assert set(chunks(step(sched))) == {"a", "b", "c"}  # 6 blocks; d waits on max_num_seqs
    out = step(sched)  # a takes the free block; b needs one: c, the last admitted, is the victim
    assert chunks(out) == {"a": (8, 1, True), "b": (8, 1, True)} and out.preempted == ("c",)
    c = reqs[2]
    assert [r.request_id for r in sched.waiting] == ["c", "d"]
    assert c.output_token_ids == _expected(c)[:1] and c.num_preemptions == 1
    while sched.has_unfinished():
        step(sched)
    assert all(r.output_token_ids == _expected(r) for r in reqs)
    assert sched.block_manager.num_free_blocks == 7


def test_preempted_request_finds_its_blocks_in_the_prefix_cache():
    sched = make_scheduler(num_blocks=5, block_size=4, caching=True)
    sched.add_request(make_req("a", 8, max_tokens=2))
    b = make_req("b", 8, max_tokens=8)
    sched.add_request(b)
    step(sched)
    assert step(sched).preempted == ("b",)  # b's 2 full blocks stay cached, evictable
    out = step(sched)  # a finished last step: b resumes from its cached prompt
    assert chunks(out) == {"b": (8, 1, True)} and b.num_cached_tokens == 8
    while sched.has_unfinished():
        step(sched)
    assert b.output_token_ids == _expected(b)


def test_abort_frees_blocks_and_is_idempotent():
    sched = make_scheduler(num_blocks=8, block_size=4)
    sched.add_request(make_req("a", 8, max_tokens=10))
    sched.add_request(make_req("b", 8, max_tokens=10))
    step(sched)
    sched.add_request(make_req("c", 8, max_tokens=10))
    assert sched.num_waiting == 1
    out = sched.schedule()
    sched.abort(["a", "c"])
    sched.update(out, {i.request.request_id: 1 for i in out.scheduled if i.samples})  # a skipped
    assert sched.get("a") is None and sched.get("b") is not None
    sched.abort("a")
    sched.finish("nope", RequestStatus.FINISHED_ABORTED)
    assert sched.num_running == 1 and sched.num_waiting == 0
    sched.block_manager.check_invariants(sched.running)
    sched.abort(["b"])
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 8


def test_request_too_large_for_the_cache_is_an_error_not_a_hang():
    sched = make_scheduler(num_blocks=3, block_size=4)
    big, small = make_req("big", 13, max_tokens=2), make_req("small", 4, max_tokens=2)
    sched.add_request(big)
    sched.add_request(small)
    out = step(sched)
    assert [e.request_id for e in out.errors] == ["big"] and "3" in out.errors[0].message
    assert big.status is RequestStatus.FINISHED_ERROR and big.finish_reason == "error"
    assert chunks(out) == {"small": (0, 4, True)}
    while sched.has_unfinished():
        step(sched)
    assert small.status is RequestStatus.FINISHED_LENGTH


def test_request_outgrowing_the_cache_during_decode_is_an_error():
    sched = make_scheduler(num_blocks=3, block_size=4)
    req = make_req("a", 10, max_tokens=10)
    sched.add_request(req)
    for _ in range(100):
        if not sched.has_unfinished():
            break
        step(sched)
    assert req.status is RequestStatus.FINISHED_ERROR
    assert req.num_tokens == 13 and req.num_preemptions == 0  # computed 12 slots, sampled a 13th
    assert sched.block_manager.num_free_blocks == 3


def test_prompt_longer_than_max_model_len_is_an_error():
    sched = make_scheduler(max_model_len=16)
    sched.add_request(make_req("a", 17))
    out = sched.schedule()
    assert out.is_empty and out.errors[0].request_id == "a" and "max_model_len" in out.errors[0].message
    assert not sched.has_unfinished()


def test_random_run_loop_completes_every_request():
    rng = random.Random(0)
    block_size, num_blocks = 4, 24
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, budget=13, max_num_seqs=6)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(4, 24))] for _ in range(4)]
    pending = []
    for i in range(120):
        tail = [rng.randrange(1000) for _ in range(rng.randrange(20))]
        prompt = rng.choice(prefixes)[: rng.randrange(1, 24)] + tail
        pending.append(make_req(f"r{i}", prompt=prompt or [1], max_tokens=rng.randrange(1, 30)))
    all_reqs = list(pending)
    kv: dict[int, dict[int, int]] = {}  # block id -> {offset: token id}, the fake KV cache
    for _ in range(5000):
        for _ in range(rng.randrange(0, 3)):
            if pending:
                sched.add_request(pending.pop(0))
        if not pending and not sched.has_unfinished():
            break
        out = sched.schedule()
        for item in out.scheduled:  # KV of every earlier position must hold that position's token
            req = item.request
            for pos in range(item.start + item.num_tokens):
                block = req.block_ids[pos // block_size]
                if pos < item.start:
                    assert kv[block][pos % block_size] == req.token_id_at(pos), (req.request_id, pos)
                else:
                    kv.setdefault(block, {})[pos % block_size] = req.token_id_at(pos)
        sampled = {i.request.request_id: fake_token(i.request) for i in out.scheduled if i.samples}
        sched.update(out, sampled)
        for item in out.scheduled:
            if item.samples and len(item.request.output_token_ids) >= item.request.params.max_tokens:
                sched.finish(item.request, RequestStatus.FINISHED_LENGTH)
        sched.block_manager.check_invariants(list(sched.running) + list(sched.waiting))
    else:
        pytest.fail("run loop did not finish")
    bm = sched.block_manager
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in all_reqs)
    assert all(r.output_token_ids == _expected(r) for r in all_reqs)
    assert bm.num_free_blocks == num_blocks and bm.usage == 0.0
    assert bm.prefix_cache_hits > 0 and bm.num_evictions > 0
    assert sum(r.num_preemptions for r in all_reqs) > 0


def test_a_sample_in_flight_that_would_overflow_the_cache_waits_for_its_value():
    """Async scheduling: a request whose next token would need more blocks than the cache has is
    not failed while that token is still a placeholder (it may be the request's last), and not
    scheduled either; once the token is back, a request that goes on fails as it always did."""
    from expertmesh.engine.scheduler import PLACEHOLDER

    sched = make_scheduler(num_blocks=3, block_size=4, budget=64)
    req = make_req("a", prompt_len=11, max_tokens=10)
    sched.add_request(req)
    out = sched.schedule()  # the prefill of 11 tokens: 3 blocks
    sched.advance(out)
    assert req.output_token_ids == [PLACEHOLDER] and req.num_tokens == 12
    out2 = sched.schedule()  # position 11 fits the 3 blocks: its decode goes ahead
    assert chunks(out2) == {"a": (11, 1, True)} and not out2.errors
    sched.advance(out2)  # 13 tokens with the new placeholder: a 4th block the cache does not have
    sched.update(out, {"a": 5}, advanced=True)
    out3 = sched.schedule()
    assert not out3.scheduled and not out3.errors and req.status is RequestStatus.RUNNING  # waits
    sched.update(out2, {"a": 6}, advanced=True)
    out4 = sched.schedule()  # 13 known tokens need 4 blocks of 4: can never run
    assert [e.request_id for e in out4.errors] == ["a"] and req.status is RequestStatus.FINISHED_ERROR
    assert sched.block_manager.num_free_blocks == 3
