"""Sampling: the filtered distribution against hand-computed and brute-force oracles, draws against
that distribution, seeding, the repetition-penalty rule, parameter validation, and (on CUDA) that a
draw can be captured in a CUDA graph without a host sync."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ossq.engine.sampling import Sampler, SamplingParams, filtered_probs, penalize_repeats

# The textbook distribution for nucleus / min-p cases: cumulative mass .5, .8, .95, 1.
HAND_PROBS = [0.5, 0.3, 0.15, 0.05]


def hand_logits() -> torch.Tensor:
    return torch.tensor([HAND_PROBS], dtype=torch.float64).log()  # (1, 4)


def random_logits(batch: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def reference_probs(row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Brute-force float64 statement of the documented pipeline for one row: set-based filters, each
    on the distribution renormalized after the one before."""

    def renormalized(keep: set[int]) -> np.ndarray:
        out = np.zeros_like(probs)
        out[list(keep)] = probs[list(keep)]
        return out / out.sum()

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


# ---- greedy and seeding ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 1.0, 20.0])
def test_top_k_of_one_samples_the_argmax_at_any_temperature(temperature: float) -> None:
    logits = random_logits(16, 500, seed=0)
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=3))
    for _ in range(5):
        assert torch.equal(sampler(logits), logits.argmax(-1))


def test_temperature_zero_returns_the_argmax_as_int64() -> None:
    logits = random_logits(8, 300, seed=1)
    tokens = Sampler(SamplingParams(temperature=0.0, top_k=5, top_p=0.5))(logits)
    assert tokens.dtype == torch.int64 and tokens.shape == (8,)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(filtered_probs(logits, SamplingParams()).argmax(-1), logits.argmax(-1))
    assert torch.equal(filtered_probs(logits, SamplingParams()).sum(-1), torch.ones(8))


def test_same_seed_replays_the_same_tokens_and_other_seeds_do_not() -> None:
    logits = random_logits(4, 1000, seed=2, scale=0.5)  # flat enough that every draw is a gamble
    params = SamplingParams(temperature=1.0, seed=1234)
    other = SamplingParams(temperature=1.0, seed=1)
    draws = {name: [] for name in ("a", "b", "c")}
    samplers = {"a": Sampler(params), "b": Sampler(params), "c": Sampler(other)}
    for _ in range(50):
        for name, sampler in samplers.items():
            draws[name].append(sampler(logits))
    a, b, c = (torch.stack(draws[name]) for name in ("a", "b", "c"))  # (50, 4) each
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a[:, 0].tolist())) > 25  # the generator advances between calls


# ---- the filtered distribution ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_alone_gives_softmax_of_scaled_logits(temperature: float) -> None:
    logits = random_logits(3, 200, seed=4)
    expected = torch.softmax(logits / temperature, dim=-1)
    probs = filtered_probs(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=0)  # a few float32 ulps


@pytest.mark.parametrize("k", [1, 2, 17, 199])
def test_top_k_keeps_exactly_the_k_largest_and_renormalizes(k: int) -> None:
    logits = random_logits(5, 200, seed=5)
    probs = filtered_probs(logits, SamplingParams(temperature=0.7, top_k=k))
    top = logits.topk(k, dim=-1).indices  # (B, k)
    assert torch.equal((probs > 0).sum(-1), torch.full((5,), k))
    assert torch.equal(probs.gather(-1, top) > 0, torch.ones(5, k, dtype=torch.bool))
    expected = torch.softmax(logits.gather(-1, top) / 0.7, dim=-1)
    torch.testing.assert_close(probs.gather(-1, top), expected)


def test_top_k_larger_than_the_vocabulary_keeps_everything() -> None:
    logits = random_logits(2, 10, seed=6)
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=50))
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
    probs = filtered_probs(hand_logits(), SamplingParams(temperature=1.0, top_p=top_p))
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
    filtered = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert (filtered > 0).sum().item() == kept


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (0.2, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),  # cut at .1
        (0.5, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),  # cut at .25
        (0.9, [1.0, 0, 0, 0]),
    ],
)
def test_min_p_drops_tokens_below_min_p_times_the_top_prob(min_p: float, expected: list[float]) -> None:
    probs = filtered_probs(hand_logits(), SamplingParams(temperature=1.0, min_p=min_p))
    torch.testing.assert_close(probs, torch.tensor([expected], dtype=torch.float32))


def test_min_p_keeps_a_token_exactly_at_the_cut() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()  # ratio .5 is exact in float32
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.5))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.25, 0.25]]))


def test_top_p_sees_the_distribution_left_by_top_k() -> None:
    # After top-k=3 the mass is .4/.9, .3/.9, .2/.9 = .444, .333, .222: two tokens reach .75.
    # On the unfiltered .4, .3, .2, .1 it would take three, so this fixes the documented order.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.75))
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


@pytest.mark.parametrize("params", COMBINATIONS, ids=str)
def test_filtered_probs_match_a_brute_force_reference(params: SamplingParams) -> None:
    logits = random_logits(6, 64, seed=7)
    probs = filtered_probs(logits, params)
    expected = np.stack([reference_probs(row, params) for row in logits.numpy()])
    np.testing.assert_array_equal(probs.numpy() > 0, expected > 0)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-6)


# ---- draws --------------------------------------------------------------------------------------

DRAWS = 20_000


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=0.6, top_k=5, seed=12),
        SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05, seed=13),
    ],
    ids=str,
)
def test_sampled_frequencies_match_filtered_probs(params: SamplingParams) -> None:
    logits = random_logits(1, 8, seed=8, scale=1.0)
    expected = filtered_probs(logits, params)[0]
    # One row per draw: every row gets its own noise, so this is DRAWS independent draws.
    tokens = Sampler(params)(logits.expand(DRAWS, -1))
    freq = torch.bincount(tokens, minlength=8).double() / DRAWS
    assert torch.all(freq[expected == 0] == 0)  # a filtered-out token is never drawn
    assert (freq - expected).abs().max() < 0.02  # ~6 standard errors at p = .5
    support = expected > 0
    chi2 = (DRAWS * (freq - expected)[support] ** 2 / expected[support]).sum()
    assert chi2 < 30  # the 1e-4 upper tail for the at most 7 degrees of freedom here


def test_consecutive_calls_draw_from_filtered_probs() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, seed=21)
    sampler = Sampler(params)
    tokens = torch.cat([sampler(logits) for _ in range(4000)])
    freq = torch.bincount(tokens, minlength=4).double() / len(tokens)
    assert (freq - filtered_probs(logits, params)[0]).abs().max() < 0.03  # ~4 standard errors


def test_a_zero_noise_draw_never_selects_a_filtered_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's CPU exponential_ can return exactly 0 (pytorch/pytorch#22557); force it everywhere.
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, generator=None: self.zero_())
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))(logits).tolist() == [1]


# ---- repetition penalty -------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    recent = torch.tensor([[-1, 1, 3, 1]])  # an empty slot, and token 1 twice
    out = penalize_repeats(logits, recent, SamplingParams(repetition_penalty=2.0))
    torch.testing.assert_close(out, torch.tensor([[2.0, -2.0, 0.5, 1.5, -2.0]]), rtol=0, atol=0)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]]))  # input untouched


def test_repetition_penalty_looks_only_at_the_last_repetition_context_tokens() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    recent = torch.tensor([[0, 1, 2]])
    params = SamplingParams(repetition_penalty=4.0, repetition_context=2)
    torch.testing.assert_close(penalize_repeats(logits, recent, params), torch.tensor([[2.0, -4.0, 0.125]]))


def test_repetition_penalty_applies_per_row_and_turns_greedy_away_from_a_repeat() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    recent = torch.tensor([[0, -1], [2, 2]])
    params = SamplingParams(repetition_penalty=2.0)
    assert Sampler(params)(logits, recent).tolist() == [1, 0]  # row 0: 3/2 < 2; row 1: 0 stays 0
    assert Sampler(params)(logits).tolist() == [0, 0]  # no history, no penalty


def test_filtered_probs_include_the_repetition_penalty() -> None:
    logits = random_logits(2, 50, seed=9)
    recent = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.9, top_k=10, repetition_penalty=1.5)
    expected = filtered_probs(penalize_repeats(logits, recent, params), params)
    torch.testing.assert_close(filtered_probs(logits, params, recent), expected, rtol=0, atol=0)


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
    ],
)
def test_bad_params_raise_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_boundary_params_are_accepted() -> None:
    params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=0.5)
    assert params.greedy
    assert not SamplingParams(temperature=1e-3).greedy


# ---- batches and dtypes -------------------------------------------------------------------------


def test_batch_rows_are_filtered_independently() -> None:
    logits = random_logits(4, 100, seed=10)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.85, min_p=0.02)
    rows = torch.cat([filtered_probs(logits[i : i + 1], params) for i in range(4)])
    torch.testing.assert_close(filtered_probs(logits, params), rows, rtol=0, atol=0)


def test_bf16_logits_sample_like_their_float32_values() -> None:
    logits = random_logits(3, 128, seed=11).bfloat16()
    params = SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=5)
    recent = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert torch.equal(filtered_probs(logits, params, recent), filtered_probs(logits.float(), params, recent))
    tokens = Sampler(params)(logits, recent)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, Sampler(params)(logits.float(), recent))
    assert torch.equal(Sampler(SamplingParams())(logits), logits.float().argmax(-1))


# ---- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_graph_replays_the_eager_token_stream_without_host_sync() -> None:
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.3, seed=7)
    logits = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    recent = torch.randint(-1, 4096, (4, 64), device="cuda")
    eager = Sampler(params, "cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host sync in a draw raises
    try:
        expected = torch.stack([eager(logits, recent) for _ in range(100)])  # (100, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graphed = Sampler(params, "cuda")
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(graphed.generator)
    with torch.cuda.graph(graph):
        out = graphed(logits, recent)
    draws = []
    for _ in range(100):
        graph.replay()
        draws.append(out.clone())
    assert torch.equal(torch.stack(draws), expected)
    assert len(set(expected[:, 0].tolist())) > 1  # each replay draws fresh noise
    allowed = filtered_probs(logits, params, recent) > 0  # (4, V)
    assert allowed.gather(-1, expected.T).all()
