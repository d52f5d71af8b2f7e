"""`ossq ppl`: windows, scores and KL judged against independent full forwards and closed forms."""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import pytest
import torch

from ossq.engine.engine import forward_full
from ossq.engine.load import load_model
from ossq.errors import OssqError, PromptTooLong
from ossq.harmony import ENDOFTEXT
from ossq.perplexity import PplResult, documents, evaluate, perplexity, read_tokens, token_stream, windows
from ossq.report import model_names
from ossq.synth import synthesize
from ossq.tokenizer import Tokenizer

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog, and then it sleeps in the afternoon sun.",
    "In the beginning was the word; the word was short, and the sentence ran on for a while.",
    "Perplexity is the exponential of the mean negative log-likelihood of each next token.",
]


@pytest.fixture(scope="module")
def small_model(small_checkpoint):
    return load_model(small_checkpoint, device="cpu")[0]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(PARAGRAPHS * 3))
    return path


def scored_targets(n_tokens: int, window: int, stride: int) -> list[int]:
    return [t for w in windows(n_tokens, window, stride) for t in range(max(w.first_scored, w.start + 1), w.stop + 1)]


@pytest.mark.parametrize("stride", [16, 8, 5])
def test_windows_score_every_target_once_and_never_a_windows_first_token(stride):
    spans = windows(100, 16, stride)
    assert scored_targets(100, 16, stride) == list(range(1, 100))
    assert [w.start for w in spans] == list(range(0, stride * len(spans), stride))
    assert all(w.stop - w.start <= 16 and w.first_scored > w.start for w in spans)
    assert spans[-1].stop == 99


def oracle_nll(model, ids: list[int], window: int, stride: int) -> torch.Tensor:
    """Target t is scored by the first window whose inputs reach t − 1: window k = ⌈(t − window)/stride⌉,
    run here as an independent full forward of its inputs from position 0."""
    out, logps = [], {}
    for t in range(1, len(ids)):
        start = stride * max(0, math.ceil((t - window) / stride))
        if start not in logps:
            x = torch.tensor([ids[start : min(start + window, len(ids) - 1)]])
            logps[start] = torch.log_softmax(forward_full(model, x)[0], dim=-1)
        out.append(-logps[start][t - 1 - start, ids[t]])
    return torch.stack(out)


@pytest.mark.parametrize("stride", [16, 8, 5])
def test_windowed_nll_through_a_chunked_cache_equals_independent_full_forwards(small_model, ids, stride):
    scores = evaluate(small_model, ids, window=16, stride=stride, chunk=6)
    expected = oracle_nll(small_model, ids, 16, stride)
    assert scores.nll.shape == (99,) and scores.windows == len(windows(100, 16, stride))
    torch.testing.assert_close(scores.nll, expected, rtol=1e-5, atol=1e-5)


def test_uniform_model_has_the_vocabulary_size_as_perplexity(small_model, ids):
    uniform = copy.deepcopy(small_model)
    uniform.lm_head.weight.zero_()
    result = PplResult.from_scores("uniform", evaluate(uniform, ids, window=32, stride=8))
    assert result.perplexity == pytest.approx(512, rel=1e-4)
    assert result.std_error == pytest.approx(0, abs=1e-3) and result.tokens == 99


def test_documents_are_joined_with_eos_between_and_none_after():
    def encode(text):
        return [ord(c) for c in text]

    assert token_stream(["ab", "c", "de"], encode, max_tokens=100) == [97, 98, ENDOFTEXT, 99, ENDOFTEXT, 100, 101]
    assert token_stream(["ab", "c"], encode, max_tokens=100, eos_between_docs=False) == [97, 98, 99]
    assert token_stream(["ab", "c", "de"], encode, max_tokens=4) == [97, 98, ENDOFTEXT, 99]


def test_reading_stops_once_the_stream_is_full():
    def docs():
        yield "abc"
        yield "def"
        raise AssertionError("read past max_tokens")

    assert token_stream(docs(), lambda t: list(map(ord, t)), max_tokens=5) == [97, 98, 99, ENDOFTEXT, 100]


def test_a_separated_text_file_becomes_encoded_documents_with_eos_between(text_file):
    tok = Tokenizer.o200k_harmony()
    expected = []
    for doc in PARAGRAPHS * 3:
        expected += ([ENDOFTEXT] if expected else []) + tok.encode(doc, allow_special=False)
    assert read_tokens(text_file, max_tokens=10_000, doc_separator=r"\n\s*\n") == expected
    one_doc = read_tokens(text_file, max_tokens=10_000)
    assert ENDOFTEXT not in one_doc and one_doc == tok.encode(text_file.read_text(), allow_special=False)


def test_jsonl_and_directory_sources_yield_their_documents(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "  third  "}\n')
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "skip.md").write_text("not a corpus file")
    assert list(documents(tmp_path)) == ["first", "second", "third"]
    (tmp_path / "b.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(OssqError, match="b.jsonl:1"):
        list(documents(tmp_path))


@pytest.mark.parametrize("content", ["", "  \n\n \n"])
def test_empty_data_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(OssqError, match="no text"):
        read_tokens(path, max_tokens=100)


def test_a_missing_file_is_an_error_not_a_dataset_name(tmp_path):
    with pytest.raises(OssqError, match="no such file"):
        read_tokens(tmp_path / "absent.txt", max_tokens=100)


def test_a_dataset_name_offline_says_to_pass_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: import raises ImportError
    with pytest.raises(OssqError, match="pass a local .*file"):
        read_tokens("wikitext", max_tokens=100)


def test_wikitext_rows_are_grouped_into_articles_at_top_level_titles(monkeypatch):
    rows = [" = Alpha = \n", " Alpha text . \n", " = = Section = = \n", " more . \n", "", " = Beta = \n", " b . \n"]
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"text": r} for r in rows]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(documents("wikitext")) == [
        "= Alpha = \n Alpha text . \n = = Section = = \n more .",
        "= Beta = \n b .",
    ]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    assert list(documents("other/corpus:cfg:train")) == [r.strip() for r in rows if r.strip()]
    assert calls[-1] == ("other/corpus", "cfg", "train")


def test_a_window_beyond_the_models_context_is_an_error(small_model, ids):
    with pytest.raises(PromptTooLong, match="context of 4096"):
        evaluate(small_model, ids, window=4097)


def test_kl_of_a_model_with_itself_is_zero_and_top1_agreement_one(small_model, ids):
    """Both forwards run (no shortcut for the same model): equal weights give equal distributions."""
    twin = evaluate(copy.deepcopy(small_model), ids, window=32, stride=8, chunk=8, reference=small_model)
    assert float(twin.kl.abs().max()) < 1e-7 and bool(twin.agree.all())


def test_kl_equals_torch_kl_div_and_grows_with_weight_noise(small_model, ids):
    means = []
    for scale in (0.01, 0.1, 1.0):
        noisy = copy.deepcopy(small_model)
        w = noisy.model.layers[1].self_attn.q_proj.weight
        w += scale * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
        scores = evaluate(noisy, ids, window=100, reference=small_model)
        lp = torch.log_softmax(forward_full(noisy, torch.tensor([ids[:-1]]))[0], -1)
        lq = torch.log_softmax(forward_full(small_model, torch.tensor([ids[:-1]]))[0], -1)
        expected = torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(scores.kl, expected, rtol=1e-4, atol=1e-7)
        assert torch.equal(scores.agree, lp.argmax(-1) == lq.argmax(-1))
        means.append(float(scores.kl.mean()))
    assert 0 < means[0] < means[1] < means[2]


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("ckpt") / "tiny-seed1", config="tiny", seed=1)


def test_perplexity_reports_every_model_and_an_unloadable_ones_error(tiny_checkpoint, other_tiny, text_file, tmp_path):
    empty_dir = tmp_path / "not-a-checkpoint"
    empty_dir.mkdir()
    models = [str(tiny_checkpoint), str(tmp_path / "missing"), str(empty_dir), str(other_tiny)]
    out = perplexity(
        models,
        data=str(text_file),
        doc_separator=r"\n\s*\n",
        window=48,
        stride=32,
        reference=str(tiny_checkpoint),
        kl_reference=str(tiny_checkpoint),
        device="cpu",
        progress=False,
        json_path=tmp_path / "ppl.json",
        markdown_path=tmp_path / "ppl.md",
        plot_path=tmp_path / "ppl.png",  # matplotlib is in the test extra
    )
    ref, missing, empty, other = out.results
    n = out.settings["tokens"] - 1
    assert missing.error and "does not exist" in missing.error and missing.perplexity is None
    assert empty.error and "config.json" in empty.error
    assert ref.error is None and ref.tokens == other.tokens == n and ref.windows == len(windows(n + 1, 48, 32))
    assert ref.kl_mean == 0 and ref.kl_p99 == 0 and ref.top1_agreement == 1
    assert other.kl_mean > 0 and other.perplexity != ref.perplexity
    tokens = read_tokens(text_file, max_tokens=100_000, doc_separator=r"\n\s*\n")
    alone = PplResult.from_scores("", evaluate(load_model(other_tiny, device="cpu")[0], tokens, window=48, stride=32))
    assert other.perplexity == pytest.approx(alone.perplexity, rel=1e-6) and other.std_error > 0

    data = json.loads((tmp_path / "ppl.json").read_text())
    assert [r["path"] for r in data["rows"]] == models
    assert [r["model"] for r in data["rows"]] == model_names(models)
    assert data["rows"][0]["perplexity"] == ref.perplexity and data["rows"][3]["kl_mean"] == other.kl_mean
    change = next(c for c in data["comparison"] if c["metric"] == "perplexity")["changes_pct"][model_names(models)[3]]
    assert change == pytest.approx(100 * (other.perplexity / ref.perplexity - 1))
    md = (tmp_path / "ppl.md").read_text()
    assert f"{ref.perplexity:.3f}" in md and f"{other.kl_mean:.5f}" in md and "does not exist" in md
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_with_only_failing_models_is_an_error(small_checkpoint, text_file):
    # the 512-token vocabulary cannot hold the text's ids; a window past the context (4096) fails first
    with pytest.raises(OssqError, match="every model failed.*vocabulary"):
        perplexity([str(small_checkpoint)], data=str(text_file), window=32, device="cpu", progress=False)
    with pytest.raises(OssqError, match="every model failed.*context of 4096"):
        perplexity([str(small_checkpoint)], data=str(text_file), window=8192, device="cpu", progress=False)
