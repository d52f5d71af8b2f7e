"""Speculative decoding keeps the target's output: greedy token for token with every drafter (itself at
100 % acceptance, an unrelated model, a perturbed twin, n-gram), across sliding-window and block
boundaries and rollbacks of every length; sampling in distribution (chi-square over seeded draws); the
caches after a rollback equal a run that never drafted; batched equals alone; the flags and refusals."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from ossq.cli import build_parser, main
from ossq.engine.engine import Engine, EngineConfig, forward_full
from ossq.engine.generate import load, stream_generate
from ossq.engine.sampling import SamplingBatch, SamplingParams, filtered_probs
from ossq.engine.speculative import (
    NGRAM,
    Draft,
    NgramDrafter,
    SpeculativeConfig,
    Speculator,
    speculative_engine,
)
from ossq.errors import InvalidArgument
from tests.conftest import random_model, small_config

K = 4
CONFIG = EngineConfig(kv_cache_tokens=2048)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def twin(model):
    """The model with its weights perturbed: a draft that agrees often but not always (a low-bit twin)."""
    twin = random_model()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, b in twin.named_buffers():
            if not name.endswith("inv_freq"):
                b.add_(0.1 * b.std() * torch.randn(b.shape, generator=gen))
    return twin


def prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(engine: Engine, ids: list[int], max_tokens: int, params: SamplingParams | None = None) -> list[int]:
    rid = engine.add_request(ids, params, max_tokens=max_tokens)
    tokens = [out.token for out in engine.stream(rid) if out.token is not None]
    engine.release(rid)
    return tokens


def spec_run(model, draft, ids, max_tokens, params=None, **spec) -> tuple[list[int], Speculator]:
    engine = speculative_engine(model, CONFIG, SpeculativeConfig(draft, K, **spec))
    rid = engine.add_request(ids, params, max_tokens=max_tokens)
    tokens = [out.token for out in engine.stream(rid) if out.token is not None]
    return tokens, engine.speculator


# A 13-token prompt and 70 tokens: positions cross the 8-token window many times and 5 block boundaries.
PROMPT, MAX_TOKENS = prompt(13, seed=3), 70


@pytest.fixture(scope="module")
def plain(model):
    return generate(Engine(model, CONFIG), PROMPT, MAX_TOKENS)


def test_the_model_as_its_own_draft_accepts_every_draft_and_gives_the_plain_greedy_tokens(model, plain):
    tokens, spec = spec_run(model, model, PROMPT, MAX_TOKENS)
    assert tokens == plain
    stats = spec.stats
    assert stats.acceptance_rate == 1.0
    assert stats.draft_tokens >= K * (stats.verify_steps - 1)  # K a step, but where max_tokens cuts the last
    assert stats.verify_steps <= math.ceil((MAX_TOKENS - 1) / (K + 1))  # K + 1 tokens per verification


def test_an_unrelated_draft_model_is_mostly_rejected_and_changes_no_greedy_token(model, plain):
    tokens, spec = spec_run(model, random_model(seed=7), PROMPT, MAX_TOKENS)
    assert tokens == plain
    assert spec.stats.verify_steps > 0 and spec.stats.acceptance_rate < 0.2
    assert spec.draft_length(0) == 1  # adaptive K: low acceptance drafts one token


def test_drafting_that_cannot_pay_its_verification_pauses_but_for_probes(model, plain):
    # An unrelated draft is rarely accepted: at a verification cost of 3 plain steps it cannot pay, so the
    # request drafts only at every PROBE_EVERY-th position (and at the first, before any rate is known).
    from ossq.engine.speculative import PROBE_EVERY

    tokens, spec = spec_run(model, random_model(seed=7), PROMPT, MAX_TOKENS, verify_cost=3.0)
    assert tokens == plain
    assert 1 < spec.stats.verify_steps <= 1 + MAX_TOKENS // PROBE_EVERY
    assert spec.draft_length(0, PROBE_EVERY + 1) == 0 and spec.draft_length(0, 2 * PROBE_EVERY) == 1


def test_a_perturbed_twin_is_accepted_in_part_and_changes_no_greedy_token(model, twin, plain):
    tokens, spec = spec_run(model, twin, PROMPT, MAX_TOKENS)
    assert tokens == plain
    assert 0.2 < spec.stats.acceptance_rate < 1


@pytest.mark.parametrize("max_kv_size", [None, 24])
def test_ngram_speculation_gives_the_plain_greedy_tokens(model, max_kv_size):
    ids = prompt(6, seed=4) * 3 + prompt(5, seed=5)  # repetition for the lookup to find
    config = EngineConfig(kv_cache_tokens=2048, max_kv_size=max_kv_size)
    expected = generate(Engine(model, config), ids, MAX_TOKENS)
    engine = speculative_engine(model, config, SpeculativeConfig(NGRAM, K))
    assert generate(engine, ids, MAX_TOKENS) == expected
    stats = engine.speculator.stats
    assert stats.verify_steps > 0 and 0 < stats.accepted_tokens < stats.draft_tokens


class ScriptedDrafter:
    """Proposes the true continuation for its first j tokens and wrong ones after, j cycling 0..K, so that
    every rollback length from K (nothing accepted) to 0 (all accepted) happens, in a known order."""

    def __init__(self, truth: Sequence[int], vocab: int) -> None:
        self.truth, self.vocab = list(truth), vocab
        self.right = itertools.cycle(range(K + 1))

    def propose(self, wanted):
        drafts = []
        for req, k in wanted:
            true = self.truth[len(req.tokens) : len(req.tokens) + k]
            j = next(self.right)
            drafts.append(Draft(true[:j] + [(t + 1) % self.vocab for t in true[j:]]))
        return drafts

    def sync(self, req) -> None:
        pass

    def forget(self, request_id: int) -> None:
        pass


def scripted_engine(model, truth: Sequence[int]) -> Engine:
    drafter = ScriptedDrafter(truth, model.config.vocab_size)
    return Engine(model, CONFIG, speculator=Speculator(drafter, num_draft_tokens=K, adaptive=False))


def collect(engine: Engine, ids: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Tokens and the logits of every position from the last prompt token on (rows in position order)."""
    rid = engine.add_request(ids, max_tokens=max_tokens, logits_from=len(ids) - 1)
    tokens, rows, starts = [], [], []
    for out in engine.stream(rid):
        if out.token is not None:
            tokens.append(out.token)
        if out.logits is not None:
            rows.append(out.logits)
            starts.append(out.logits_start)
    assert starts == sorted(starts)
    return tokens, torch.cat(rows)


def test_rollbacks_of_every_length_leave_caches_that_give_the_logits_of_a_run_that_never_drafted(model, plain):
    expected_tokens, expected_logits = collect(Engine(model, CONFIG), PROMPT, MAX_TOKENS)
    engine = scripted_engine(model, PROMPT + plain)
    accepted = Counter()
    record = engine.speculator._record

    def spy(request_id: int, drafted: int, n: int) -> None:
        accepted[(drafted, n)] += 1
        record(request_id, drafted, n)

    engine.speculator._record = spy
    tokens, logits = collect(engine, PROMPT, MAX_TOKENS)
    assert tokens == expected_tokens == plain
    assert {n for drafted, n in accepted if drafted == K} == set(range(K + 1))  # rollbacks of K .. 0 tokens
    # every position's logits, those computed right after a rollback included, equal the plain run's
    assert logits.shape == expected_logits.shape
    assert (logits - expected_logits).abs().max() < 1e-4


def test_rejected_drafts_return_their_blocks_and_key_no_prefix_cache_block(model, plain):
    engine = scripted_engine(model, PROMPT + plain)
    rid = engine.add_request(PROMPT, max_tokens=MAX_TOKENS)
    while not engine.request(rid).finish_reason:
        engine.step()
        req = engine.request(rid)
        if not req.finish_reason:
            assert len(req.blocks) == -(-req.num_computed // 16)  # nothing held past the committed positions
    cached = {tuple(engine.blocks.blocks[b].tokens) for b in engine.blocks.cached.values()}
    committed = PROMPT + plain
    assert cached == {tuple(committed[i : i + 16]) for i in range(0, len(committed) - 16, 16)}


def test_several_requests_at_once_give_what_each_gives_alone(model, twin):
    requests = [(prompt(n, seed=n), m, SAMPLED if n % 2 else None) for n, m in [(3, 20), (9, 30), (17, 12), (40, 25)]]
    for draft in (twin, NGRAM):
        engine = speculative_engine(model, CONFIG, SpeculativeConfig(draft, K))
        ids = {}
        for i, (ids_, m, params) in enumerate(requests):
            ids[engine.add_request(ids_, params, max_tokens=m)] = i
            engine.step()  # arrivals at different steps: prefill beside verification
        batched: dict[int, list[int]] = {i: [] for i in range(len(requests))}
        while engine.has_unfinished:
            for out in engine.step():
                if out.token is not None:
                    batched[ids[out.request_id]].append(out.token)
        for rid, i in ids.items():
            batched[i] = engine.request(rid).output
        for i, (ids_, m, params) in enumerate(requests):
            alone, _ = spec_run(model, draft, ids_, m, params)
            assert batched[i] == alone, (draft if isinstance(draft, str) else "twin", i)
            if params is None:
                assert alone == generate(Engine(model, CONFIG), ids_, m)


def test_the_ngram_index_finds_what_a_scan_finds():
    rng = random.Random(0)
    drafter = NgramDrafter()
    for trial in range(30):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        req = type("Req", (), {"id": trial, "tokens": []})()
        for n in range(1, len(tokens) + 1):  # grown a token at a time, as a request is
            req.tokens = tokens[:n]
            assert drafter._lookup(req, 3) == scan(tokens[:n], 3), (tokens[:n],)


def scan(tokens: list[int], k: int, max_ngram: int = 4) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest suffix n-gram, by brute force."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + k]
    return []


# ---- sampling keeps the target's distribution ----------------------------------------------------------
VOCAB, DRAWS, DRAWN = 3, 3000, 4  # every sequence of 4 tokens over 3 ids: 81 outcomes


def exact_distribution(model, ids: list[int], params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(t0..t3) of plain sampling with `params`, from full forwards over every prefix."""
    probs = {(): 1.0}
    for _ in range(DRAWN):
        nxt = {}
        for seq, p in probs.items():
            context = ids + list(seq)
            logits = forward_full(model, torch.tensor([context]))[0, -1:]
            recent = torch.tensor([context[-params.repetition_context :]])
            row = filtered_probs(logits, SamplingBatch.from_params([params]), recent)[0]
            nxt.update({(*seq, t): p * row[t].item() for t in range(VOCAB)})
        probs = nxt
    return probs


def chi_square_bound(df: int, z: float = 3.7) -> float:
    """The chi-square quantile at ~1e-4 (Wilson–Hilferty): a correct sampler fails 1 run in 10,000."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "draft, params",
    [
        ("model", SamplingParams(temperature=1.0)),
        ("model", SamplingParams(temperature=0.7, top_k=2, repetition_penalty=1.5, repetition_context=3)),
        (NGRAM, SamplingParams(temperature=1.0, top_p=0.9)),
    ],
)
def test_sampling_with_speculation_keeps_the_targets_distribution(draft, params):
    target = random_model(small_config(vocab_size=VOCAB), seed=3)
    drafter = random_model(small_config(vocab_size=VOCAB), seed=4) if draft == "model" else NGRAM
    ids = [0, 1, 2, 1, 0, 1]
    exact = exact_distribution(target, ids, params)
    config = EngineConfig(kv_cache_tokens=DRAWS * 16, max_num_seqs=512, prefix_cache=False)
    engine = speculative_engine(target, config, SpeculativeConfig(drafter, 2))
    seeded = [SamplingParams(**{**vars(params), "seed": s}) for s in range(DRAWS)]
    rids = [engine.add_request(ids, p, max_tokens=DRAWN) for p in seeded]
    while engine.has_unfinished:
        engine.step()
    counts = Counter(tuple(engine.request(r).output) for r in rids)
    stats = engine.speculator.stats
    assert stats.verify_steps >= DRAWS and 0.1 < stats.acceptance_rate < 0.95  # drafts accepted and rejected
    assert set(counts) <= {s for s, p in exact.items() if p > 0}  # nothing the target cannot produce
    cells = sorted(exact, key=exact.get)
    pooled_p, pooled_n, chi2, df = 0.0, 0, 0.0, -1
    for s in cells:  # pool the rarest outcomes until each cell expects at least 5 draws
        pooled_p, pooled_n = pooled_p + exact[s], pooled_n + counts[s]
        if pooled_p * DRAWS >= 5:
            chi2 += (pooled_n - pooled_p * DRAWS) ** 2 / (pooled_p * DRAWS)
            pooled_p, pooled_n, df = 0.0, 0, df + 1
    assert df > 10
    assert chi2 < chi_square_bound(df), (chi2, df)


# ---- the API, the flags and the refusals -------------------------------------------------------------------
def test_stream_generate_speculates_with_the_same_text_and_reports_acceptance(tiny_checkpoint):
    model, tokenizer = load(tiny_checkpoint, device="cpu")
    text = "the cat sat on the mat and the cat sat on the mat and the cat"
    plain = list(stream_generate(model, tokenizer, text, max_tokens=12))
    spec = list(stream_generate(model, tokenizer, text, max_tokens=12, draft_model=NGRAM, num_draft_tokens=3))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert plain[-1].stats.acceptance_rate is None
    assert spec[-1].stats.acceptance_rate is not None and spec[-1].stats.mean_accepted_length is not None
    with pytest.raises(InvalidArgument, match="num_draft_tokens"):
        next(stream_generate(model, tokenizer, text, draft_model=NGRAM, num_draft_tokens=0))


def test_a_draft_model_of_another_vocabulary_is_refused(model):
    with pytest.raises(InvalidArgument, match="vocabulary of 256 tokens.*same tokenizer"):
        speculative_engine(model, CONFIG, SpeculativeConfig(random_model(small_config(vocab_size=256))))
    with pytest.raises(InvalidArgument, match="max_kv_size"):
        speculative_engine(model, EngineConfig(max_kv_size=64), SpeculativeConfig(model))
    with pytest.raises(InvalidArgument, match="draft_model must be a model or 'ngram'"):
        SpeculativeConfig("ngrams")


@pytest.mark.parametrize("command", ["generate", "chat", "bench", "serve"])
def test_the_draft_flags_parse_on_every_generating_command(command):
    source = ["-p", "hi"] if command == "generate" else []
    args = build_parser().parse_args([command, "-m", "x", *source, "--draft-model", NGRAM, "--num-draft-tokens", "5"])
    assert (args.draft_model, args.num_draft_tokens) == (NGRAM, 5)
    default = build_parser().parse_args([command, "-m", "x", *source])
    assert (default.draft_model, default.num_draft_tokens) == (None, 3)


def test_the_cli_refuses_a_draft_length_below_one_and_a_draft_of_another_vocabulary(
    tiny_checkpoint, small_checkpoint, capsys
):
    generate = ["generate", "-m", str(tiny_checkpoint), "-p", "hi", "--max-tokens", "3"]
    assert main([*generate, "--draft-model", NGRAM, "--num-draft-tokens", "0"]) == 2
    assert "--num-draft-tokens must be at least 1, got 0" in capsys.readouterr().err
    assert main([*generate, "--draft-model", str(small_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "--draft-model" in err and "same tokenizer" in err and "Traceback" not in err


def test_the_cli_generates_with_ngram_speculation_and_prints_the_acceptance(tiny_checkpoint, capsys):
    argv = ["generate", "-m", str(tiny_checkpoint), "-p", "hi", "--raw", "--max-tokens", "8", "--draft-model", NGRAM]
    assert main(argv) == 0
    assert "draft acceptance" in capsys.readouterr().out


def test_the_server_speculating_by_ngram_gives_concurrent_requests_their_plain_greedy_text(tiny_checkpoint):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import asyncio

    import ossq
    from tests.test_serve import ossq_serve

    prompts = ["hi", "hello", "Hi there", "hi hi hi"]  # "hi" repeats itself: n-gram drafts get accepted
    model, tokenizer = ossq.load(tiny_checkpoint, device="cpu")
    alone = [ossq.generate(model, tokenizer, p, max_tokens=16, sampling=SamplingParams()) for p in prompts]
    server = ossq_serve(tiny_checkpoint, "--draft-model", NGRAM, "--num-draft-tokens", "4", "--kv-cache-tokens", "4096")
    try:
        client = server.async_client()

        async def together() -> list[str]:
            outs = await asyncio.gather(
                *(client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0) for p in prompts)
            )
            return [o.choices[0].text for o in outs]

        assert asyncio.run(together()) == alone
        metrics = server.metrics()
        assert 0 < metrics["ossq_draft_tokens_accepted_total"] <= metrics["ossq_draft_tokens_total"]
    finally:
        server.stop()


def test_bench_runs_the_same_prompt_plain_and_speculating_and_reports_speed_up_and_acceptance(
    small_checkpoint, tiny_checkpoint, tmp_path
):
    from ossq.bench import bench

    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    settings = dict(prompt_tokens=8, gen_tokens=14, repeats=2, warmup=0, device="cpu", progress=False)
    outputs = dict(json_path=json_path, markdown_path=markdown_path)
    result = bench([str(small_checkpoint)], **settings, **outputs, draft_model=str(small_checkpoint))
    (model,) = result.models
    assert len(model.speculative.run.runs) == len(model.main.runs) == 2
    drafts, row = model.speculative.drafts, result.report().rows[0]
    # per run, 13 tokens after the first: 3 verifications of 3 drafts each + its own, then the last one alone
    assert (drafts.draft_tokens, drafts.accepted_tokens, drafts.verify_steps) == (2 * 9, 2 * 9, 2 * 3)
    assert row["acceptance_pct"] == 100  # the model drafting for itself
    assert row["accepted_per_step"] == row["drafted_per_step"] == drafts.accepted_tokens / drafts.verify_steps
    assert row["spec_speedup"] == pytest.approx(row["spec_generation_tps"] / row["generation_tps"])
    assert json.loads(json_path.read_text())["settings"]["num_draft_tokens"] == 3
    assert "draft acceptance" in markdown_path.read_text() and "speculative speed-up" in markdown_path.read_text()
    with pytest.raises(InvalidArgument, match="same tokenizer"):
        bench([str(small_checkpoint)], **settings, draft_model=str(tiny_checkpoint))
    with pytest.raises(InvalidArgument, match="num_draft_tokens"):
        bench([str(small_checkpoint)], **settings, draft_model=NGRAM, num_draft_tokens=0)
