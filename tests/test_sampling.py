"""Sampling helpers: property tests against naive definitions, plus the glue in `sample_next`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from zamba2.sampling import (
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    logprobs,
    min_p_filter,
    sample_next,
    token_counts,
    top_k_filter,
    top_logprobs,
    top_p_filter,
)

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def logit_batches(draw, max_batch: int = 3, max_vocab: int = 40) -> torch.Tensor:
    """(B, V) float32 logits from a seed, with occasional exact ties."""
    batch = draw(st.integers(1, max_batch))
    vocab = draw(st.integers(2, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * scale
    if draw(st.booleans()):  # quantise so that ties appear
        logits = torch.round(logits * 2) / 2
    return logits


# --- filters ---------------------------------------------------------------------------------------------


@SETTINGS
@given(logit_batches(), st.integers(1, 50))
def test_top_k_keeps_exactly_the_k_largest(logits: torch.Tensor, k: int) -> None:
    out = top_k_filter(logits, k)
    vocab = logits.shape[-1]
    for row, filtered in zip(logits, out, strict=True):
        kept = torch.isfinite(filtered)
        assert int(kept.sum()) == min(k, vocab)
        assert torch.equal(filtered[kept], row[kept])
        if k < vocab:
            # Every kept logit is >= every dropped one.
            assert row[kept].min() >= row[~kept].max()


@SETTINGS
@given(logit_batches(), st.integers(1, 50))
def test_top_k_keeps_what_a_stable_sort_keeps(logits: torch.Tensor, k: int) -> None:
    """The threshold-and-ties filter keeps exactly the first k of a stable descending sort (lower ids first)."""
    out = top_k_filter(logits, k)
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    want = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, True)
    assert torch.equal(torch.isfinite(out), want)


def test_top_k_ties_are_deterministic() -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)


@SETTINGS
@given(logit_batches(), st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits: torch.Tensor, p: float) -> None:
    out = top_p_filter(logits, p)
    probs = torch.softmax(logits.double(), dim=-1)
    tol = 1e-5  # the filter accumulates in fp32
    for row_probs, filtered in zip(probs, out, strict=True):
        kept = torch.isfinite(filtered)
        kept_probs = row_probs[kept]
        assert kept.any()
        if (~kept).any():  # kept tokens are the most likely ones
            assert kept_probs.min() >= row_probs[~kept].max()
        assert kept_probs.sum() >= p - tol
        # Minimal: removing the least likely kept token falls short of p.
        if kept.sum() > 1:
            assert kept_probs.sum() - kept_probs.min() < p + tol


def test_top_p_always_keeps_the_top_token() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    out = top_p_filter(logits, 1e-9)
    assert torch.isfinite(out).tolist() == [[True, False, False], [False, False, True]]


@SETTINGS
@given(logit_batches(), st.floats(0.0, 1.0))
def test_min_p_keeps_exactly_tokens_above_threshold(logits: torch.Tensor, min_p: float) -> None:
    out = min_p_filter(logits, min_p)
    probs = torch.softmax(logits.float(), dim=-1)
    expected = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    assert torch.equal(torch.isfinite(out), expected)
    assert torch.equal(out[expected], logits[expected])


# --- penalties -------------------------------------------------------------------------------------------


def naive_repetition_penalty(logits, prev_ids, penalty, mask=None):
    out = logits.clone()
    for b in range(logits.shape[0]):
        seen = set()
        for t in range(prev_ids.shape[1]):
            if mask is None or mask[b, t]:
                seen.add(int(prev_ids[b, t]))
        for token in seen:
            x = logits[b, token]  # a 0-d fp32 tensor, so the arithmetic matches the vectorised code
            out[b, token] = x / penalty if x > 0 else x * penalty
    return out


@SETTINGS
@given(logit_batches(), st.integers(0, 2**31 - 1), st.floats(0.2, 3.0), st.booleans())
def test_repetition_penalty_matches_naive_loop(logits, seed, penalty, use_mask) -> None:
    g = torch.Generator().manual_seed(seed)
    batch, vocab = logits.shape
    prev = torch.randint(0, vocab, (batch, 7), generator=g)
    mask = torch.rand(batch, 7, generator=g) > 0.3 if use_mask else None
    if mask is not None:
        prev = torch.where(mask, prev, torch.full_like(prev, -100))  # padding may hold junk ids
    out = apply_repetition_penalty(logits, prev, penalty, mask)
    expected = naive_repetition_penalty(logits, prev, penalty, mask)
    diff = (out - expected).abs().max().item()
    assert diff < 1e-6, f"max diff {diff}"


def test_token_counts_and_presence_frequency() -> None:
    prev = torch.tensor([[1, 1, 3, 0], [2, 2, 2, 2]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    counts = token_counts(prev, 5, mask)
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 2, 0, 0]]
    assert token_counts(prev, 5).tolist() == [[1, 2, 0, 1, 0], [0, 0, 4, 0, 0]]
    logits = torch.zeros(2, 5)
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    expected = torch.tensor([[0, -1.0, 0, -0.75, 0], [0, 0, -1.0, 0, 0]])
    assert torch.allclose(out, expected), f"max diff {(out - expected).abs().max()}"


def test_shape_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="logits"):
        top_k_filter(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="prev_mask"):
        token_counts(torch.zeros(2, 3, dtype=torch.long), 5, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="counts"):
        apply_presence_frequency_penalty(torch.zeros(2, 5), torch.zeros(2, 4), 0.1, 0.1)


# --- sample_next -----------------------------------------------------------------------------------------


@SETTINGS
@given(logit_batches(max_vocab=200))
def test_tiny_temperature_equals_greedy(logits: torch.Tensor) -> None:
    top2 = torch.topk(logits, 2, dim=-1).values
    assume(bool(((top2[:, 0] - top2[:, 1]) > 1e-3).all()))
    greedy = sample_next(logits, SamplingParams())
    assert torch.equal(greedy, logits.argmax(-1))
    cold = sample_next(
        logits, SamplingParams(do_sample=True, temperature=1e-6), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(cold, greedy)
    assert torch.equal(sample_next(logits, SamplingParams(do_sample=True, temperature=0.0)), greedy)


def test_seeded_generator_is_reproducible_and_respects_filters() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=10, top_p=0.9, min_p=0.05)
    draws = [sample_next(logits, params, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert draws[0].dtype == torch.long and draws[0].shape == (4,)
    allowed = torch.topk(logits, 10, dim=-1).indices
    for seed in range(20):
        ids = sample_next(logits, params, torch.Generator().manual_seed(seed))
        assert all(int(i) in allowed[b].tolist() for b, i in enumerate(ids))


def test_sampling_distribution_follows_softmax() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(20000, 3)
    ids = sample_next(logits, SamplingParams(do_sample=True), torch.Generator().manual_seed(3))
    freq = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.02), f"freq {freq}"


def test_penalties_in_sample_next_change_the_greedy_pick() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    prev = torch.tensor([[0, 0], [0, 0]])
    mask = torch.tensor([[True, True], [False, False]])
    params = SamplingParams(repetition_penalty=1.5)
    assert sample_next(logits, params, prev_ids=prev, prev_mask=mask).tolist() == [1, 0]
    params = SamplingParams(frequency_penalty=0.1)  # 3.0 - 2 * 0.1 = 2.8 < 2.9
    assert sample_next(logits, params, prev_ids=prev, prev_mask=mask).tolist() == [1, 0]
    params = SamplingParams(presence_penalty=0.05)  # 2.95 > 2.9: still token 0
    assert sample_next(logits, params, prev_ids=prev, prev_mask=mask).tolist() == [0, 0]


def test_sample_next_accepts_half_precision_logits() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    ids = sample_next(logits, SamplingParams(do_sample=True, top_p=0.5), torch.Generator().manual_seed(0))
    assert ids.shape == (2,)


def test_logprobs_helpers() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.bfloat16)
    lp = logprobs(logits)
    assert lp.dtype == torch.float32
    assert math.isclose(float(lp.exp().sum()), 1.0, rel_tol=1e-6)
    values, ids = top_logprobs(logits, 2)
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(values, lp[:, [1, 2]])
    with pytest.raises(ValueError, match="k"):
        top_logprobs(logits, 0)


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
    ],
)
def test_validation_names_the_field(field: str, value: float) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate()
    with pytest.raises(ValueError, match=field):
        sample_next(torch.zeros(1, 4), params)


def test_defaults_are_valid_and_greedy() -> None:
    params = SamplingParams().validate()
    assert params.greedy
    assert not SamplingParams(do_sample=True).greedy
    assert SamplingParams(do_sample=True, temperature=0).greedy
