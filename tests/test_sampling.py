"""Sampling: the filtered distribution against hand-computed and brute-force oracles, draws against
that distribution, the counter-based noise (reproducible per (seed, counter), independent of the
rest of the batch), the repetition-penalty rule, parameter validation, that `sample` never reads a
tensor on the host, and (on CUDA) that a draw can be captured in a CUDA graph."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from ossq.engine import sampling
from ossq.engine.sampling import SamplingBatch, SamplingParams, filtered_probs, penalize_repeats, random_seed, sample
from ossq.errors import InvalidArgument

# The textbook distribution for nucleus / min-p cases: cumulative mass .5, .8, .95, 1.
HAND_PROBS = [0.5, 0.3, 0.15, 0.05]


def hand_logits() -> torch.Tensor:
    return torch.tensor([HAND_PROBS], dtype=torch.float64).log()  # (1, 4)


def random_logits(batch: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def same(params: SamplingParams, rows: int = 1) -> SamplingBatch:
    """A batch of `rows` requests that all share `params`."""
    return SamplingBatch.from_params([params] * rows)


def probs_of(logits: torch.Tensor, params: SamplingParams, recent: torch.Tensor | None = None) -> torch.Tensor:
    return filtered_probs(logits, same(params, logits.shape[0]), recent)


def draw(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    seeds: int | Sequence[int] | torch.Tensor = 0,
    counters: int | Sequence[int] | torch.Tensor = 0,
    recent: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sample` with one params for every row, or one per row; an int seed or counter for all rows."""
    rows = logits.shape[0]
    batch = same(params, rows) if isinstance(params, SamplingParams) else SamplingBatch.from_params(params)
    seeds, counters = (torch.as_tensor(x if isinstance(x, (int, torch.Tensor)) else list(x)) for x in (seeds, counters))
    seeds, counters = seeds.long().expand(rows), counters.long().expand(rows)
    return sample(logits, batch, seeds=seeds, counters=counters, recent=recent)


def reference_probs(row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Brute-force float64 statement of the documented pipeline for one row: set-based filters, each
    on the distribution renormalized after the one before."""

    def renormalized(keep: set[int]) -> np.ndarray:
        out = np.zeros_like(probs)
        out[list(keep)] = probs[list(keep)]
        return out / out.sum()

    if params.greedy:
        return np.eye(len(row))[row.argmax()]
    scaled = row.astype(np.float64) / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = sorted(range(len(row)), key=lambda i: -probs[i])
    keep = set(order[: params.top_k]) if params.top_k else set(order)
    probs = renormalized(keep)
    if params.top_p < 1:
        nucleus, mass = set(), 0.0
        for i in (i for i in order if i in keep):
            nucleus.add(i)
            mass += probs[i]
            if mass >= params.top_p:
                break
        keep = nucleus
        probs = renormalized(keep)
    if params.min_p > 0:
        keep = {i for i in keep if probs[i] >= params.min_p * probs.max()}
        probs = renormalized(keep)
    return probs


# Every step of the pipeline, each row with other params: greedy, filters alone and together,
# penalties with their own strength and context.
MIXED = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.5, repetition_context=4),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=30, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=0.8),
    SamplingParams(temperature=0.5, top_k=10, top_p=0.8, min_p=0.2, repetition_penalty=1.3, repetition_context=3),
]


def mixed_recent(rows: int, vocab: int) -> torch.Tensor:
    """(rows, 12) oldest-first windows with a few empty (-1) slots at the front, as before they fill."""
    recent = torch.randint(0, vocab, (rows, 12), generator=torch.Generator().manual_seed(1))
    recent[::2, :3] = -1
    return recent


# ---- greedy and seeding ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 1.0, 20.0])
def test_top_k_of_one_samples_the_argmax_at_any_temperature(temperature: float) -> None:
    logits = random_logits(16, 500, seed=0)
    for counter in range(5):
        tokens = draw(logits, SamplingParams(temperature=temperature, top_k=1), seeds=3, counters=counter)
        assert torch.equal(tokens, logits.argmax(-1))


def test_temperature_zero_returns_the_argmax_as_int64() -> None:
    logits = random_logits(8, 300, seed=1)
    tokens = draw(logits, SamplingParams(temperature=0.0, top_k=5, top_p=0.5), seeds=range(8))
    assert tokens.dtype == torch.int64 and tokens.shape == (8,)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(probs_of(logits, SamplingParams()).argmax(-1), logits.argmax(-1))
    assert torch.equal(probs_of(logits, SamplingParams()).sum(-1), torch.ones(8))


def test_same_seed_and_counter_redraw_the_same_token_and_other_seeds_do_not() -> None:
    logits = random_logits(1, 1000, seed=2, scale=0.5).expand(50, -1)  # flat: every draw is a gamble
    params = SamplingParams(temperature=1.0)
    stream = draw(logits, params, seeds=1234, counters=range(50))  # one request, tokens 0..49
    assert torch.equal(draw(logits, params, seeds=1234, counters=range(50)), stream)
    assert len(set(stream.tolist())) > 25  # the counter moves the noise
    assert torch.equal(draw(logits, params, seeds=1234, counters=7), stream[7].expand(50))
    for other in (1, 1234 + 2**32, 1234 - 2**32):  # the high 32 bits of a seed count too
        assert (draw(logits, params, seeds=other, counters=range(50)) != stream).sum() > 40
    assert len(set(draw(logits, params, seeds=range(50)).tolist())) > 25


@pytest.mark.parametrize("seed", [0, -1, 2**32, 2**63 - 1, -(2**63)])
def test_any_int64_seed_samples_a_token_the_filters_allow(seed: int) -> None:
    logits = random_logits(3, 100, seed=3)
    params = SamplingParams(temperature=1.0, top_k=10, seed=seed)
    tokens = draw(logits, params, seeds=seed, counters=[0, 1, 2**40])
    assert probs_of(logits, params).gather(-1, tokens[:, None]).gt(0).all()


def test_random_seed_is_a_fresh_63_bit_seed() -> None:
    seeds = {random_seed() for _ in range(100)}
    assert len(seeds) == 100
    assert all(0 <= s < 2**63 for s in seeds)
    assert max(seeds) >= 2**60  # all 63 bits are used, not a 32-bit seed
    SamplingParams(seed=random_seed())


# ---- the counter-based noise --------------------------------------------------------------------


def lowbias32(x: int) -> int:
    """The reference lowbias32 (Chris Wellons' hash-prospector) on Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_int64_hash_equals_32_bit_lowbias32() -> None:
    values = [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF] + torch.randint(0, 2**32, (200,)).tolist()
    assert sampling._lowbias32(torch.tensor(values)).tolist() == [lowbias32(v) for v in values]


def test_the_noise_is_finite_and_positive_at_the_extreme_hashes() -> None:
    # A zero q would make 0 / 0 = NaN at a filtered token, and argmax prefers NaN.
    u = sampling._open_unit(torch.tensor([0, 1, 2**31, 2**32 - 1]))
    assert u.dtype == torch.float32 and (u > 0).all() and (u < 1).all()
    q = -torch.log(u)
    assert torch.isfinite(q).all() and (q > 0).all()


# ---- the filtered distribution ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_alone_gives_softmax_of_scaled_logits(temperature: float) -> None:
    logits = random_logits(3, 200, seed=4)
    expected = torch.softmax(logits / temperature, dim=-1)
    probs = probs_of(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=0)  # a few float32 ulps


@pytest.mark.parametrize("k", [1, 2, 17, 199])
def test_top_k_keeps_exactly_the_k_largest_and_renormalizes(k: int) -> None:
    logits = random_logits(5, 200, seed=5)
    probs = probs_of(logits, SamplingParams(temperature=0.7, top_k=k))
    top = logits.topk(k, dim=-1).indices  # (B, k)
    assert torch.equal((probs > 0).sum(-1), torch.full((5,), k))
    assert torch.equal(probs.gather(-1, top) > 0, torch.ones(5, k, dtype=torch.bool))
    expected = torch.softmax(logits.gather(-1, top) / 0.7, dim=-1)
    torch.testing.assert_close(probs.gather(-1, top), expected)


def test_top_k_larger_than_the_vocabulary_keeps_everything() -> None:
    logits = random_logits(2, 10, seed=6)
    probs = probs_of(logits, SamplingParams(temperature=1.0, top_k=50))
    torch.testing.assert_close(probs, logits.softmax(-1))


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.8, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # .5 + .3 reaches .8 exactly: two tokens
        (0.81, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        (0.5, [1.0, 0, 0, 0]),
        (0.01, [1.0, 0, 0, 0]),
        (1e-9, [1.0, 0, 0, 0]),  # the top token is always kept
        (1.0, HAND_PROBS),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p: float, expected: list[float]) -> None:
    probs = probs_of(hand_logits(), SamplingParams(temperature=1.0, top_p=top_p))
    torch.testing.assert_close(probs, torch.tensor([expected], dtype=torch.float32))


@pytest.mark.parametrize(
    ("probs", "top_p", "kept"),
    [([0.6, 0.3, 0.05, 0.05], 0.9, 2), ([0.6, 0.25, 0.15], 0.6, 1), ([0.4, 0.35, 0.25], 0.4, 1)],
)
def test_top_p_reached_exactly_on_paper_is_not_extended_by_float_rounding(
    probs: list[float], top_p: float, kept: int
) -> None:
    # In float32 the preceding mass of each of these comes out a few ulps below top_p.
    logits = torch.tensor([probs], dtype=torch.float64).log()
    filtered = probs_of(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert (filtered > 0).sum().item() == kept


def test_top_p_keeps_a_tiny_tail_when_it_is_off() -> None:
    # top_p = 1 must not become 1 - TOP_P_SLACK: tokens below 1e-6 of the mass stay in play.
    logits = torch.tensor([[0.0, -20.0, -20.0]])
    probs = probs_of(logits, SamplingParams(temperature=1.0, top_k=3))
    assert (probs > 0).all()


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (0.2, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # cut at .1
        (0.5, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # cut at .25
        (0.9, [1.0, 0, 0, 0]),
    ],
)
def test_min_p_drops_tokens_below_min_p_times_the_top_prob(min_p: float, expected: list[float]) -> None:
    probs = probs_of(hand_logits(), SamplingParams(temperature=1.0, min_p=min_p))
    torch.testing.assert_close(probs, torch.tensor([expected], dtype=torch.float32))


def test_min_p_keeps_a_token_exactly_at_the_cut() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()  # ratio .5 is exact in float32
    probs = probs_of(logits, SamplingParams(temperature=1.0, min_p=0.5))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0.25]]))


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(temperature=1.0, top_k=2), 3),  # the second and third tie at the k-th place
        (SamplingParams(temperature=1.0, top_p=0.5), 3),  # .36 + .27 reaches .5 at a tied token
        (SamplingParams(temperature=1.0, top_k=1), 1),
    ],
    ids=str,
)
def test_ties_at_a_cut_are_all_kept(params: SamplingParams, kept: int) -> None:
    logits = torch.tensor([[0.4, 0.3, 0.3, 0.1]]).log()  # probabilities .36, .27, .27, .09
    probs = probs_of(logits, params)
    assert (probs > 0).sum().item() == kept
    assert probs[0, 1] == probs[0, 2]
    assert set(draw(logits.expand(200, -1), params, counters=range(200)).tolist()) == set(range(kept))


def test_top_p_sees_the_distribution_left_by_top_k() -> None:
    # After top-k=3 the mass is .4/.9, .3/.9, .2/.9 = .444, .333, .222: two tokens reach .75.
    # On the unfiltered .4, .3, .2, .1 it would take three, so this fixes the documented order.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    probs = probs_of(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.75))
    torch.testing.assert_close(probs, torch.tensor([[0.4 / 0.7, 0.3 / 0.7, 0, 0]]))


COMBINATIONS = [
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.8, top_k=30, top_p=0.7),
    SamplingParams(temperature=1.5, top_p=0.95, min_p=0.1),
    SamplingParams(temperature=0.5, top_k=10, top_p=0.8, min_p=0.2),
    SamplingParams(temperature=2.0, top_k=3, min_p=0.3),
]


def assert_matches_reference(probs: torch.Tensor, logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    expected = np.stack([reference_probs(row, p) for row, p in zip(logits.numpy(), params, strict=True)])
    np.testing.assert_array_equal(probs.numpy() > 0, expected > 0)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("params", COMBINATIONS, ids=str)
def test_filtered_probs_match_a_brute_force_reference(params: SamplingParams) -> None:
    logits = random_logits(6, 64, seed=7)
    assert_matches_reference(probs_of(logits, params), logits, [params] * 6)


def test_a_batch_of_different_params_matches_the_reference_row_by_row() -> None:
    params = [SamplingParams(), *COMBINATIONS, SamplingParams(temperature=0.9)] * 2
    logits = random_logits(len(params), 64, seed=8)
    assert_matches_reference(filtered_probs(logits, SamplingBatch.from_params(params)), logits, params)


# ---- draws --------------------------------------------------------------------------------------

DRAWS = 20_000
DRAWN = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, top_k=5),
    SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05),
]


def assert_frequencies_match(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    """tokens (N,) independent draws from `expected` (V,): a chi-square bound and no filtered token."""
    freq = torch.bincount(tokens, minlength=len(expected)).double() / len(tokens)
    assert torch.all(freq[expected == 0] == 0)  # a filtered-out token is never drawn
    assert (freq - expected).abs().max() < 0.02  # ~6 standard errors at p = .5
    support = expected > 0
    chi2 = (len(tokens) * (freq - expected)[support] ** 2 / expected[support]).sum()
    assert chi2 < 30  # the 1e-4 upper tail for the at most 7 degrees of freedom here


@pytest.mark.parametrize("params", DRAWN, ids=str)
def test_one_requests_token_stream_draws_from_filtered_probs(params: SamplingParams) -> None:
    logits = random_logits(1, 8, seed=9, scale=1.0)
    # One seed, counters 0..DRAWS-1: the tokens one request draws over its output.
    tokens = draw(logits.expand(DRAWS, -1), params, seeds=42, counters=range(DRAWS))
    assert_frequencies_match(tokens, probs_of(logits, params)[0].double())


@pytest.mark.parametrize("params", DRAWN, ids=str)
def test_first_tokens_of_many_seeds_draw_from_filtered_probs(params: SamplingParams) -> None:
    logits = random_logits(1, 8, seed=10, scale=1.0)
    tokens = draw(logits.expand(DRAWS, -1), params, seeds=range(DRAWS), counters=0)
    assert_frequencies_match(tokens, probs_of(logits, params)[0].double())


def test_consecutive_tokens_of_a_stream_are_independent() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # probabilities .64, .24, .09, .03
    params = SamplingParams(temperature=1.0)
    tokens = draw(logits.expand(DRAWS, -1), params, seeds=7, counters=range(DRAWS))
    pairs = tokens[0::2] * 4 + tokens[1::2]  # (token c, token c + 1) for even c, as one of 16 cells
    p = probs_of(logits, params)[0].double()
    expected = torch.outer(p, p).flatten()
    freq = torch.bincount(pairs, minlength=16).double() / len(pairs)
    chi2 = (len(pairs) * (freq - expected) ** 2 / expected).sum()
    assert chi2 < 45  # the 1e-4 upper tail for 15 degrees of freedom


# ---- batches ------------------------------------------------------------------------------------


# Batches whose shared top-k width is narrower than the vocabulary (300 below), or all of it
# because top_k is larger: the rows that use no top-k must not be cut to that width.
NARROW = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.9, top_k=5),
    SamplingParams(temperature=1.0, min_p=0.1),
]
WIDE = [SamplingParams(temperature=1.1, top_k=1000), SamplingParams(temperature=1.0, top_k=3, min_p=0.1)]


@pytest.mark.parametrize("params", [MIXED, NARROW, WIDE], ids=["mixed", "narrow", "wide"])
def test_a_batch_of_different_params_equals_each_row_sampled_alone(params: list[SamplingParams]) -> None:
    logits = random_logits(len(params), 300, seed=11)
    recent = mixed_recent(len(params), 300)
    batch = SamplingBatch.from_params(params)
    alone = torch.cat([filtered_probs(logits[i : i + 1], same(p), recent[i : i + 1]) for i, p in enumerate(params)])
    torch.testing.assert_close(filtered_probs(logits, batch, recent), alone, rtol=0, atol=0)
    seeds = [2**40 + 7919 * i for i in range(len(params))]  # any int64 seeds
    for counter in range(16):
        tokens = draw(logits, params, seeds=seeds, counters=counter, recent=recent)
        for i, p in enumerate(params):
            one = draw(logits[i : i + 1], p, seeds=seeds[i], counters=counter, recent=recent[i : i + 1])
            assert tokens[i] == one[0], (i, counter)


def test_a_rows_token_does_not_depend_on_the_rest_of_the_batch() -> None:
    # A pool of requests: MIXED, and two that widen the shared sort (top-p over the whole
    # vocabulary, a large top-k). Each batch below is some of them in some order.
    params = [*MIXED, SamplingParams(temperature=1.0, top_p=0.99), SamplingParams(temperature=1.0, top_k=250)]
    pool = len(params)
    logits, recent, seeds = random_logits(pool, 300, seed=12), mixed_recent(pool, 300), torch.arange(100, 100 + pool)
    shuffled = torch.randperm(pool, generator=torch.Generator().manual_seed(0)).tolist()
    batches = [list(range(len(MIXED))), shuffled, [i for i in shuffled if i < len(MIXED)], [3], [5, 0]]

    def tokens(rows: list[int], counters: torch.Tensor) -> dict[int, int]:
        picked = [params[i] for i in rows]
        out = draw(logits[rows], picked, seeds=seeds[rows], counters=counters[rows], recent=recent[rows])
        return dict(zip(rows, out.tolist(), strict=True))

    for step in range(16):
        counters = torch.arange(pool) + step  # each request at its own point in its output
        drawn = [tokens(rows, counters) for rows in batches]
        everyone = drawn[1]
        for rows, got in zip(batches, drawn, strict=True):
            assert got == {i: everyone[i] for i in rows}, (rows, step)
    probs = filtered_probs(logits[shuffled], SamplingBatch.from_params([params[i] for i in shuffled]), recent[shuffled])
    alone = filtered_probs(logits[: len(MIXED)], SamplingBatch.from_params(MIXED), recent[: len(MIXED)])
    order = torch.tensor(shuffled).argsort()
    torch.testing.assert_close(probs[order][: len(MIXED)], alone, rtol=0, atol=0)


def test_batch_flags_come_from_the_params_and_greedy_rows_use_no_filter() -> None:
    greedy_filtered = SamplingBatch.from_params([SamplingParams(top_k=5, top_p=0.5, min_p=0.5)] * 2)
    assert greedy_filtered.all_greedy
    assert not (greedy_filtered.any_top_k_or_top_p or greedy_filtered.any_min_p or greedy_filtered.any_penalty)
    assert greedy_filtered.top_k.tolist() == [0, 0] and greedy_filtered.top_p.tolist() == [1, 1]
    batch = SamplingBatch.from_params(MIXED)
    assert not batch.all_greedy and batch.any_top_k_or_top_p and batch.any_min_p and batch.any_penalty
    assert batch.top_k.dtype == batch.repetition_context.dtype == torch.int64
    assert batch.temperature.dtype == batch.top_p.dtype == batch.min_p.dtype == torch.float32
    assert batch.repetition_penalty.dtype == torch.float32


@pytest.mark.parametrize(
    ("first", "width"),
    [
        (SamplingParams(temperature=1.0, top_k=40), 40),
        (SamplingParams(temperature=1.0, top_k=5, top_p=0.9), 20),
        (SamplingParams(temperature=1.0, top_p=0.9), 0),  # top-p alone needs the whole vocabulary
        (SamplingParams(temperature=1.0), 20),
        (SamplingParams(top_p=0.9), 20),  # a greedy row's top-p is ignored
    ],
    ids=str,
)
def test_top_k_width_is_the_largest_top_k_any_row_needs(first: SamplingParams, width: int) -> None:
    batch = SamplingBatch.from_params([first, SamplingParams(temperature=1.0, top_k=20)])
    assert batch.top_k_width == width
    assert batch.candidate_count(vocab=10) == 10 and batch.candidate_count(vocab=1000) == (width or 1000)


# ---- repetition penalty -------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    recent = torch.tensor([[-1, 1, 3, 1]])  # an empty slot, and token 1 twice
    out = penalize_repeats(logits, recent, same(SamplingParams(repetition_penalty=2.0)))
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0, 0.5, 1.5, -2.0]]), rtol=0, atol=0)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]]))  # input untouched


def test_repetition_penalty_looks_only_at_the_last_repetition_context_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    recent = torch.tensor([[0, 1, 2]])
    batch = same(SamplingParams(repetition_penalty=4.0, repetition_context=2))
    torch.testing.assert_close(penalize_repeats(logits, recent, batch), torch.tensor([[2.0, -4.0, 0.125]]))


def test_repetition_penalty_uses_each_rows_own_strength_and_context_and_skips_empty_slots() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]]).expand(5, -1)
    recent = torch.tensor([[3, 0, -1, 1]] * 4 + [[-1, -1, -1, -1]])  # oldest first
    params = [
        SamplingParams(repetition_penalty=2.0, repetition_context=2),  # counts -1, 1: only token 1
        SamplingParams(repetition_penalty=4.0, repetition_context=4),  # tokens 3, 0, 1
        SamplingParams(repetition_penalty=2.0, repetition_context=0),  # nothing
        SamplingParams(repetition_penalty=2.0, repetition_context=100),  # more than the window: all of it
        SamplingParams(repetition_penalty=2.0),  # an empty window
    ]
    unchanged = [2.0, -1.0, 0.5, 3.0]
    expected = torch.tensor(
        [[2.0, -2.0, 0.5, 3.0], [0.5, -4.0, 0.5, 0.75], unchanged, [1.0, -2.0, 0.5, 1.5], unchanged]
    )
    out = penalize_repeats(logits, recent, SamplingBatch.from_params(params))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_repetition_penalty_applies_per_row_and_turns_greedy_away_from_a_repeat() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    recent = torch.tensor([[0, -1], [2, 2]])
    params = SamplingParams(repetition_penalty=2.0)
    assert draw(logits, params, recent=recent).tolist() == [1, 0]  # row 0: 3/2 < 2; row 1: 0 stays 0
    assert draw(logits, params).tolist() == [0, 0]  # no history, no penalty


def test_filtered_probs_include_the_repetition_penalty() -> None:
    logits = random_logits(2, 50, seed=14)
    recent = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.9, top_k=10, repetition_penalty=1.5)
    expected = probs_of(penalize_repeats(logits, recent, same(params, 2)), params)
    torch.testing.assert_close(probs_of(logits, params, recent), expected, rtol=0, atol=0)


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.01),
        ("min_p", 1.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_context", -1),
        ("seed", 1.5),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
    ],
)
def test_bad_params_raise_invalid_argument_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as error:
        SamplingParams(**{field: value})
    assert error.value.name == field
    assert isinstance(error.value, ValueError)
    assert str(error.value).startswith(f"{field} must ") and str(error.value).endswith(f", got {value!r}")


def test_bad_temperature_message_reads_as_the_cli_shows_it() -> None:
    with pytest.raises(InvalidArgument, match=r"^temperature must be >= 0 \(0 means greedy\), got -1\.0$"):
        SamplingParams(temperature=-1.0)


def test_boundary_params_are_accepted() -> None:
    params = SamplingParams(
        temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=0.5, repetition_context=0, seed=2**63 - 1
    )
    assert params.greedy
    assert not SamplingParams(temperature=1e-3, seed=-(2**63)).greedy


# ---- dtypes, host syncs and CUDA ------------------------------------------------------------------


def test_bf16_logits_sample_like_their_float32_values() -> None:
    logits = random_logits(3, 128, seed=15).bfloat16()
    params = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.2)
    recent = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert torch.equal(probs_of(logits, params, recent), probs_of(logits.float(), params, recent))
    tokens = draw(logits, params, seeds=5, counters=range(3), recent=recent)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, draw(logits.float(), params, seeds=5, counters=range(3), recent=recent))
    assert torch.equal(draw(logits, SamplingParams()), logits.float().argmax(-1))


# Every way a tensor's value reaches the host.
HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.unique,
    torch.unique,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
}


class HostReads(TorchFunctionMode):
    """Records every torch call under it that would copy a tensor's value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_host_read_recorder_sees_a_host_read() -> None:
    x = torch.ones(2)
    with HostReads() as reads:
        x.sum().item()
        bool(x[0] > 0)
    assert reads.seen == ["item", "__bool__"]


def test_sample_and_filtered_probs_never_read_a_tensor_on_the_host() -> None:
    logits, recent = random_logits(len(MIXED), 300, seed=16), mixed_recent(len(MIXED), 300)
    batch = SamplingBatch.from_params(MIXED)  # host work, before the check
    seeds, counters = torch.arange(len(MIXED)), torch.full((len(MIXED),), 3)
    with HostReads() as reads:
        sample(logits, batch, seeds=seeds, counters=counters, recent=recent)
        filtered_probs(logits, batch, recent)
    assert reads.seen == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_graph_replays_the_eager_token_stream_without_host_sync() -> None:
    rows = len(MIXED)
    batch = SamplingBatch.from_params(MIXED, "cuda")
    logits = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    recent = torch.randint(-1, 4096, (rows, 64), device="cuda")
    seeds = torch.tensor([random_seed() for _ in MIXED], device="cuda")
    counters = torch.zeros(rows, dtype=torch.int64, device="cuda")

    def step() -> torch.Tensor:
        return sample(logits, batch, seeds=seeds, counters=counters, recent=recent)

    expected = []
    torch.cuda.set_sync_debug_mode("error")  # any host sync in a draw raises
    try:
        for counter in range(100):
            counters.fill_(counter)
            expected.append(step())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = torch.stack(expected)  # (100, B)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm up outside the capture, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    draws = []
    for counter in range(100):
        counters.fill_(counter)
        graph.replay()
        draws.append(out.clone())
    assert torch.equal(torch.stack(draws), expected)
    assert len(set(expected[:, 2].tolist())) > 1  # each counter draws fresh noise
    assert len(set(expected[:, 0].tolist())) == 1  # a greedy row does not
    allowed = filtered_probs(logits, batch, recent) > 0  # (B, V)
    assert allowed.gather(-1, expected.T).all()
