"""Sampler: each filter against its definition, penalties against a hand-worked example,
seeded reproducibility across batch compositions, and the sampled distribution against softmax."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from expertmesh.engine.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRow,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
)
from expertmesh.engine.sampling_params import SamplingParams

V = 32
EOS = 5


def row(prompt=(1, 2, 3), output=(), seed=None, **params) -> SamplingRow:
    p = SamplingParams(seed=seed, **params)
    return SamplingRow(p, list(prompt), list(output), make_generator(seed, "cpu"), frozenset({EOS}))


def sample(logits_BV: torch.Tensor, rows: list[SamplingRow], **batch_fields):
    batch = SamplingBatch.build(rows, logits_BV.shape[1], "cpu")
    if batch_fields:
        batch = dataclasses.replace(batch, **batch_fields)
    return Sampler()(logits_BV, batch)


def logits(B: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_build_skips_what_nobody_asked_for():
    batch = SamplingBatch.build([row(temperature=0.0), row()], V, "cpu")
    assert not batch.all_greedy and not batch.any_top_k and not batch.any_top_p
    assert not batch.any_min_p and not batch.any_penalties and batch.max_num_logprobs is None
    assert batch.prompt_ids_BL is None and batch.min_tokens_rows_M is None and batch.seeded_rows == ()
    assert batch.temperature_B.tolist() == [1.0, 1.0]   # greedy rows never divide by 0
    batch = SamplingBatch.build([row(temperature=0.0, seed=3), row(seed=4, top_k=4, logprobs=2)], V, "cpu")
    assert batch.seeded_rows == (1,) and batch.any_top_k and batch.max_num_logprobs == 2


def test_steady_decode_reuses_the_params_tensors_and_a_new_param_rebuilds_them():
    """The same params objects (a decode step after the one before): the per-params tensors are
    the same tensors, no upload; a different params object in any row builds fresh ones, with its
    values."""
    rows = [row(temperature=0.7, top_p=0.9), row(temperature=0.0)]
    first = SamplingBatch.build(rows, V, "cpu")
    again = SamplingBatch.build([dataclasses.replace(r, output_token_ids=[4]) for r in rows], V, "cpu")
    assert again.temperature_B is first.temperature_B and again.greedy_B is first.greedy_B
    changed = SamplingBatch.build([rows[0], row(temperature=0.3)], V, "cpu")
    assert changed.temperature_B is not first.temperature_B
    assert changed.temperature_B.tolist() == pytest.approx([0.7, 0.3]) and not changed.greedy_B.any()
    assert SamplingBatch.build(rows[:1], V, "cpu").temperature_B.tolist() == pytest.approx([0.7])


def test_plain_greedy_takes_the_argmax_in_the_logits_own_dtype():
    """All-greedy rows with nothing else asked: the argmax of the bf16 logits, as the float32 path
    gives it (ties included: 0.1 and 0.1000001 are one bf16 value); asking logprobs leaves the path."""
    x_BV = logits(8).to(torch.bfloat16)
    x_BV[3, 7] = x_BV[3, 9] = x_BV[3].max() + 1  # a tie: the first index wins either way
    greedy = [row(temperature=0.0)] * 8
    assert SamplingBatch.build(greedy, V, "cpu").plain_greedy
    out = sample(x_BV, greedy)
    assert torch.equal(out.token_ids_B, x_BV.float().argmax(-1)) and int(out.token_ids_B[3]) == 7
    asked = [row(temperature=0.0, logprobs=1)] * 8
    assert not SamplingBatch.build(asked, V, "cpu").plain_greedy
    assert torch.equal(sample(x_BV, asked).token_ids_B, out.token_ids_B)


def test_greedy_equals_argmax_alone_and_mixed():
    x_BV = logits(8)
    assert torch.equal(sample(x_BV, [row(temperature=0.0)] * 8).token_ids_B, x_BV.argmax(-1))
    rows = [row(temperature=0.0) if i % 2 else row(temperature=1.5, top_p=0.9) for i in range(8)]
    out = sample(x_BV, rows).token_ids_B
    assert torch.equal(out[1::2], x_BV.argmax(-1)[1::2])


def test_tiny_temperature_is_argmax():
    x_BV = logits(64, seed=1)
    for temperature in (1e-6, 1e-3):   # 1e-6 is greedy by definition, 1e-3 samples a near one-hot
        out = sample(x_BV, [row(temperature=temperature)] * 64).token_ids_B
        assert torch.equal(out, x_BV.argmax(-1))


def test_top_k_1_and_tiny_top_p_equal_greedy():
    x_BV = logits(64, seed=2)
    torch.manual_seed(0)
    assert torch.equal(sample(x_BV, [row(top_k=1)] * 64).token_ids_B, x_BV.argmax(-1))
    assert torch.equal(sample(x_BV, [row(top_p=1e-6)] * 64).token_ids_B, x_BV.argmax(-1))
    # Mixed: top-k through the sort path beside top-p rows.
    rows = [row(top_k=1) if i % 2 else row(top_p=1e-6, top_k=5) for i in range(64)]
    assert torch.equal(sample(x_BV, rows).token_ids_B, x_BV.argmax(-1))


def test_top_k_fast_path_matches_the_sort_path():
    x_BV = logits(16, seed=6)
    k_B = torch.randint(1, 8, (16,), generator=torch.Generator().manual_seed(0))
    fast_BV = apply_top_k_top_p(x_BV, k_B, None, max_top_k=int(k_B.max()))
    sorted_BV = apply_top_k_top_p(x_BV, k_B, None, max_top_k=V)
    assert torch.equal(fast_BV, sorted_BV)
    assert torch.equal(torch.isfinite(fast_BV).sum(-1), k_B)


@pytest.mark.parametrize("with_top_p", [False, True])
def test_top_k_draws_only_from_the_k_best(with_top_p):
    x_BV = logits(1, seed=3).expand(4000, V).contiguous()
    torch.manual_seed(0)
    rows = [row(top_k=3, top_p=0.999 if with_top_p else 1.0)] * 4000
    drawn = set(sample(x_BV, rows).token_ids_B.tolist())
    top3 = set(x_BV[0].topk(3).indices.tolist())
    assert drawn == top3


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x_BV = probs.log().expand(4000, 4).contiguous()
    torch.manual_seed(0)
    drawn = sample(x_BV, [row(top_p=0.75)] * 4000).token_ids_B   # 0.5 < 0.75 <= 0.5 + 0.3
    assert set(drawn.tolist()) == {0, 1}


def test_min_p_filters_below_a_fraction_of_the_top():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x_BV = probs.log().expand(4000, 4).contiguous()
    torch.manual_seed(0)
    drawn = sample(x_BV, [row(min_p=0.2)] * 4000).token_ids_B   # threshold 0.1
    assert set(drawn.tolist()) == {0, 1, 2}


def test_penalties_follow_the_formula():
    x_BV = torch.tensor([[2.0, -1.0, 0.5, -2.0, 1.0, 3.0]] * 2)
    rows = [row(prompt=[0, 3], output=[2, 2, 4], repetition_penalty=2.0, presence_penalty=0.5,
                frequency_penalty=0.25),
            row(prompt=[1], output=[])]                # no penalty: padding must not touch it
    batch = SamplingBatch.build(rows, 6, "cpu")
    got_BV = apply_penalties(x_BV, batch)
    # Repetition on prompt+output {0, 2, 3, 4}: positive / 2, negative * 2.
    # Then output counts {2: 2, 4: 1}: minus 0.25 * count and 0.5 once.
    expected = [2.0 / 2, -1.0, 0.5 / 2 - 0.25 * 2 - 0.5, -2.0 * 2, 1.0 / 2 - 0.25 - 0.5, 3.0]
    assert torch.allclose(got_BV[0], torch.tensor(expected))
    assert torch.equal(got_BV[1], x_BV[1])


def test_presence_penalty_alone_changes_greedy_choice():
    x_BV = torch.tensor([[3.0, 2.9] + [0.0] * (V - 2)])
    assert sample(x_BV, [row(temperature=0.0, output=[0])]).token_ids_B.tolist() == [0]
    assert sample(x_BV, [row(temperature=0.0, output=[0], presence_penalty=0.5)]).token_ids_B.tolist() == [1]


def test_min_tokens_masks_eos_and_stop_tokens():
    x_BV = torch.zeros(4, V)
    x_BV[:, EOS], x_BV[:, 7], x_BV[:, 9] = 10.0, 9.0, 8.0
    rows = [row(temperature=0.0, output=[1], min_tokens=3, stop_token_ids=[7]),   # both masked
            row(temperature=0.0, output=[1, 1, 1], min_tokens=3, stop_token_ids=[7]),  # reached
            row(temperature=0.0, output=[1], min_tokens=3, stop_token_ids=[7], ignore_eos=True),
            row(temperature=0.0, output=[1])]
    assert sample(x_BV, rows).token_ids_B.tolist() == [9, EOS, EOS, EOS]


def test_allowed_mask_is_respected_greedy_and_sampled():
    x_BV = logits(512, seed=4)
    allowed_BV = torch.zeros(512, V, dtype=torch.bool)
    allowed_BV[:, [1, 7]] = True
    rows = [row(temperature=0.0) if i % 3 == 0 else row(temperature=2.0) for i in range(512)]
    out = sample(x_BV, rows, allowed_token_mask_BV=allowed_BV).token_ids_B
    assert set(out.tolist()) <= {1, 7}
    greedy = torch.where(x_BV[:, 1] >= x_BV[:, 7], 1, 7)
    assert torch.equal(out[::3], greedy[::3])


def _seeded_run(seed: int, make_batch, steps: int = 12) -> list[int]:
    """Tokens of one seeded row over several steps; make_batch places it among other rows."""
    generator = make_generator(seed, "cpu")
    tokens = []
    for step in range(steps):
        x_BV = logits(1, seed=100 + step)
        me = SamplingRow(SamplingParams(seed=seed, top_p=0.95), [1], list(tokens), generator, frozenset())
        rows, index = make_batch(me, step)
        x_full_BV = torch.randn(len(rows), V)
        x_full_BV[index] = x_BV[0]
        tokens.append(sample(x_full_BV, rows).token_ids_B[index].item())
    return tokens


def test_seeded_rows_reproduce_whatever_the_batch():
    torch.manual_seed(1)
    alone = _seeded_run(7, lambda me, step: ([me], 0))
    torch.manual_seed(2)
    crowded = _seeded_run(7, lambda me, step: (
        [row(), row(seed=99 + step, top_k=3), row(temperature=0.0)][: 1 + step % 3] + [me], 1 + step % 3))
    torch.manual_seed(3)
    again = _seeded_run(7, lambda me, step: ([row(temperature=0.5)] * step + [me], step))
    assert alone == crowded == again
    assert len(set(alone)) > 1                              # it really samples
    assert _seeded_run(8, lambda me, step: ([me], 0)) != alone


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_unseeded_distribution_matches_softmax(temperature):
    n = 20000
    x_4 = torch.tensor([1.0, 0.5, 0.0, -1.0])
    torch.manual_seed(1234)
    drawn = sample(x_4.expand(n, 4).contiguous(), [row(temperature=temperature)] * n).token_ids_B
    observed = torch.bincount(drawn, minlength=4).float()
    expected = torch.softmax(x_4 / temperature, dim=0) * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0, (observed, expected)                # df = 3; p(chi2 > 25) ~ 1.5e-5


def test_logprobs_are_of_the_raw_distribution():
    x_BV = logits(6, seed=5)
    rows = [row(logprobs=3, temperature=0.7, repetition_penalty=1.5, output=[2, 3]),
            row(logprobs=0, temperature=0.0, top_k=2), row(), row(logprobs=1, min_p=0.3),
            row(temperature=0.0), row(logprobs=2, top_p=0.5)]
    out = sample(x_BV, rows)
    raw_BV = torch.log_softmax(x_BV, dim=-1)
    assert torch.allclose(out.logprobs_B, raw_BV.gather(1, out.token_ids_B[:, None]).squeeze(1))
    assert out.top_ids_BN.shape == (6, 3)
    assert torch.equal(out.top_ids_BN, raw_BV.topk(3).indices)
    assert torch.allclose(out.top_logprobs_BN, raw_BV.topk(3).values)
    assert (out.top_logprobs_BN[:, :-1] >= out.top_logprobs_BN[:, 1:]).all()
    logprob, top = out.cpu().row_logprobs(0, 3)
    assert logprob == pytest.approx(raw_BV[0, out.token_ids_B[0]].item())
    assert [t for t, _ in top] == raw_BV[0].topk(3).indices.tolist()
    assert out.row_logprobs(1, 0)[1] == []
    assert sample(x_BV, [row()] * 6).logprobs_B is None


def test_rejects_mismatched_logits():
    batch = SamplingBatch.build([row()], V, "cpu")
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, V), batch)
