"""`ossq bench` on the tiny synthetic models: the figures are consistent with the timed runs, the runs
generate exactly the asked tokens, a failing model becomes an error row, and the outputs are written."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ossq.bench import (
    BatchStats,
    RunStats,
    bench,
    length_label,
    parse_lengths,
    prompt_ids,
    time_run,
)
from ossq.config import ModelConfig, read_config_json
from ossq.device import MemoryMeter
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.generate import load
from ossq.errors import CheckpointError, OssqError
from ossq.report import model_names

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPT, GEN, REPEATS, WARMUP = 16, 8, 2, 1
CONTEXT, SWEEP, TOO_LONG = 32, 48, 5000  # the tiny preset's context is 4096 tokens


@contextlib.contextmanager
def single_thread():
    """Tiny models gain nothing from threads, and two-thread OpenMP slows down tenfold when another
    process shares the two cores of a CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def outcome(small_checkpoint, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with single_thread():
        result = bench(
            [str(small_checkpoint), str(tiny_checkpoint)],
            prompt_tokens=PROMPT,
            gen_tokens=GEN,
            context=[CONTEXT, TOO_LONG],
            batch="1,4",
            sweep_context=f"{CONTEXT},{SWEEP}",
            repeats=REPEATS,
            warmup=WARMUP,
            device="cpu",
            progress=False,
            json_path=out / "bench.json",
            markdown_path=out / "bench.md",
            plot_path=out / "bench.png",
        )
    return result, out


def rows_by_model(result):
    return {r["model"]: r for r in result.report().rows}


def test_a_missing_model_fails_before_any_model_is_measured(small_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("ossq.bench._bench_model", lambda *a: pytest.fail("measured before checking"))
    with pytest.raises(CheckpointError, match="no-such-model"):
        bench([str(small_checkpoint), str(tmp_path / "no-such-model")], progress=False)


def test_a_model_that_fails_to_run_is_an_error_row_and_the_others_still_run(small_checkpoint, tmp_path):
    result = bench(
        [str(small_checkpoint)] * 2, prompt_tokens=5000, gen_tokens=2, repeats=1, warmup=0, device="cpu", progress=False
    )
    assert all("PromptTooLong" in m.error and m.main is None for m in result.models)


def test_a_runs_times_are_the_wall_time_of_its_prefill_and_its_decode(small_checkpoint):
    """Oracle: timestamps taken by a hook around every forward, independent of the bench's own clock."""
    model, _ = load(small_checkpoint, device="cpu")
    engine = Engine(model, EngineConfig(kv_cache_tokens=256, prefix_cache=False))
    starts, ends = [], []
    model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    model.register_forward_hook(lambda *_: ends.append(time.perf_counter()))
    with single_thread():
        begin = time.perf_counter()
        run = time_run(engine, prompt_ids(PROMPT, vocab_size=model.config.vocab_size, seed=0), GEN)
        wall = time.perf_counter() - begin
    assert len(ends) == GEN  # one prefill step, GEN - 1 decode steps
    assert ends[0] - starts[0] <= run.ttft <= starts[1] - begin  # the prefill and its sample, before any decode
    assert run.ttft <= wall
    assert run.decode == pytest.approx(ends[-1] - ends[0], rel=0.25, abs=2e-3)
    assert run.ttft + run.decode <= wall


def test_rates_are_the_median_run_and_tok_s_per_gb_divides_by_peak_memory(outcome):
    result, _ = outcome
    for m in result.models:
        row = rows_by_model(result)[m.name]
        decode_rates = [(GEN - 1) / r.decode for r in m.main.runs]
        lo, hi = row["range"]["generation_tps"]
        assert lo == min(decode_rates) <= row["generation_tps"] <= max(decode_rates) == hi
        assert row["peak_memory_gb"] > 0
        assert row["tps_per_gb"] == pytest.approx(row["generation_tps"] / row["peak_memory_gb"])


def test_batches_report_aggregate_and_per_sequence_generation(outcome):
    result, _ = outcome
    for m in result.models:
        row = rows_by_model(result)[m.name]
        four = m.batches[4]
        assert isinstance(four, BatchStats) and len(four.aggregate_tps) == REPEATS
        assert row["batch_tps@4"] == pytest.approx(4 * row["sequence_tps@4"])
        assert row["batch_tps@1"] > 0


def test_size_and_bits_per_weight_match_the_checkpoint_files(outcome, tiny_checkpoint):
    """Oracle: the safetensors headers, counted as mlx-lm counts (formats.md §3.4): an MXFP4 byte holds two
    weights, scales and sinks are not parameters, the rope frequencies add head_dim/2 float32 per layer."""
    result, _ = outcome
    files = sorted(tiny_checkpoint.glob("*.safetensors"))
    nbytes = params = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                t = st.get_slice(key)
                n = math.prod(t.get_shape())
                nbytes += n * (1 if t.get_dtype() == "U8" else 2)
                params += 2 * n if key.endswith("_blocks") else 0 if key.endswith(("_scales", "sinks")) else n
    config = ModelConfig.from_dict(read_config_json(tiny_checkpoint / "config.json"))
    nbytes += config.num_hidden_layers * config.head_dim // 2 * 4
    tiny = result.models[1]
    assert tiny.size_bytes == sum(f.stat().st_size for f in files)
    assert tiny.parameters == params
    assert tiny.bits_per_weight == pytest.approx(8 * nbytes / params)


def test_a_run_prefills_once_then_decodes_exactly_gen_tokens_minus_one_steps(small_checkpoint):
    model, _ = load(small_checkpoint, device="cpu")
    engine = Engine(model, EngineConfig(kv_cache_tokens=256, prefix_cache=False))
    fed = []
    model.register_forward_pre_hook(lambda _mod, args: fed.append(tuple(args[0].tokens.shape)))
    with single_thread():
        time_run(engine, prompt_ids(PROMPT, vocab_size=model.config.vocab_size, seed=0), GEN)
    assert fed == [(PROMPT,)] + [(1,)] * (GEN - 1)


def test_context_lengths_give_columns_and_a_too_long_one_is_an_error_of_its_own(outcome):
    result, _ = outcome
    row = rows_by_model(result)["small"]
    stats = result.models[0].contexts[CONTEXT]
    assert isinstance(stats, RunStats) and stats.prompt_tokens == CONTEXT and stats.gen_tokens == GEN
    assert row[f"generation_tps@{CONTEXT}"] == pytest.approx(stats.generation_tps.median)
    assert "PromptTooLong" in row["context_errors"][str(TOO_LONG)]
    assert f"generation_tps@{TOO_LONG}" not in row and row["generation_tps"] > 0


def test_the_sweep_gives_one_point_per_context_length_per_model(outcome):
    result, _ = outcome
    decode = next(s for s in result.report().series if s.name == "decode_vs_context")
    assert set(decode.lines) == {"small", "tiny"}  # the failed model has no line
    for name, points in decode.lines.items():
        m = next(m for m in result.models if m.name == name)
        assert [x for x, _ in points] == [CONTEXT, SWEEP]
        assert points[1][1] == pytest.approx(m.contexts[SWEEP].generation_tps.median)


def test_json_markdown_and_plots_are_written(outcome):
    result, out = outcome
    d = json.loads((out / "bench.json").read_text())
    assert d["kind"] == "bench" and d["settings"]["sweep_context"] == [CONTEXT, SWEEP]
    assert [r["model"] for r in d["rows"]] == ["small", "tiny"]
    assert {
        "model",
        "path",
        "parameters",
        "size_gb",
        "bits_per_weight",
        "prompt_tps",
        "generation_tps",
        "ttft_ms",
        "total_s",
        "decode_s",
        "batch_tps@4",
        "peak_memory_gb",
        "tps_per_gb",
        "range",
    } <= set(d["rows"][0])
    gen = next(c for c in d["comparison"] if c["metric"] == "generation_tps")
    best = max(("small", "tiny"), key=lambda n: rows_by_model(result)[n]["generation_tps"])
    assert gen["winners"] == [best]
    text = (out / "bench.md").read_text()
    assert "### Comparison" in text and "generation ×4 (all)" in text
    pytest.importorskip("matplotlib")
    for name in ("bench.png", "bench-decode_vs_context.png", "bench-prefill_vs_context.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_cpu_peak_memory_is_reset_between_models():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    before = meter.peak_gb()
    block = torch.ones(50_000_000)  # 0.2 GB, touched
    assert meter.peak_gb() >= before + 0.19
    del block
    meter.reset()
    assert meter.peak_gb() < before + 0.05


def test_lengths_parse_with_k_as_1024_and_reject_nonsense():
    assert parse_lengths("1k,4k,16k") == [1024, 4096, 16384]
    assert parse_lengths([2048, "3K", "1k,2k"]) == [2048, 3072, 1024, 2048]
    assert parse_lengths(None) == []
    assert [length_label(n) for n in (1024, 16384, 1000)] == ["1k", "16k", "1000"]
    for bad in ("1m", "4 k", "", "0", "-5", "2.5k"):
        with pytest.raises(ValueError, match="bad length"):
            parse_lengths(bad)


def test_the_prompt_is_seeded_and_stays_among_ordinary_tokens_of_the_vocabulary():
    a = prompt_ids(90, vocab_size=201088, seed=0)
    assert a == prompt_ids(90, vocab_size=201088, seed=0) != prompt_ids(90, vocab_size=201088, seed=1)
    assert len(a) == 90 and max(a) < 199998
    assert max(prompt_ids(1000, vocab_size=512, seed=0)) < 512


def test_display_names_are_short_and_unique():
    assert model_names(["/ckpt/a/model", "/ckpt/b/model", "/x/c", "org/c2"]) == [
        "/ckpt/a/model",
        "/ckpt/b/model",
        "c",
        "c2",
    ]
    assert model_names(["/x/m", "/x/m"]) == ["/x/m#1", "/x/m#2"]


def test_bad_settings_fail_before_loading_anything():
    for kwargs in ({"gen_tokens": 1}, {"prompt_tokens": 0}, {"repeats": 0}, {"warmup": -1}):
        with pytest.raises(ValueError):
            bench(["/nonexistent"], progress=False, **kwargs)
    with pytest.raises(ValueError, match="at least one model"):
        bench([], progress=False)


def test_a_plot_without_matplotlib_fails_before_measuring(small_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setattr("ossq.bench._bench_model", lambda *a: pytest.fail("measured before checking"))
    with pytest.raises(OssqError, match=r"ossq\[plot\]"):
        bench([str(small_checkpoint)], progress=False, plot_path=tmp_path / "p.png")
