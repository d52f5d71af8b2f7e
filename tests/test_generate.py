"""Generation: stop tokens, stats, seeds and context limits; the CLI's happy path and its one-line errors."""

from __future__ import annotations

import pytest
import torch

from ossq.cli import main
from ossq.engine.generate import batch_generate, load, stream_generate
from ossq.engine.sampling import SamplingParams
from ossq.errors import PromptTooLong
from ossq.harmony import CALL, END, RETURN


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load(tiny_checkpoint, device="cpu")


def scripted_logits(monkeypatch, model, step_logits):
    """Replace the model's forward: every step's sampled row gets `step_logits(n)` (n = steps so far)."""
    steps = []

    def forward(batch, kv):
        logits = torch.zeros(batch.logits_rows.numel(), model.config.vocab_size)
        logits[-1] = step_logits(len(steps))
        steps.append(batch)
        return logits

    monkeypatch.setattr(model, "forward", forward)
    return steps


def scripted(monkeypatch, tiny, script: list[int], max_tokens: int = 20):
    model, tokenizer = tiny

    def one_hot(n: int) -> torch.Tensor:
        row = torch.zeros(model.config.vocab_size)
        row[script[n]] = 1.0
        return row

    scripted_logits(monkeypatch, model, one_hot)
    return list(stream_generate(model, tokenizer, "hello", max_tokens=max_tokens))


@pytest.mark.parametrize("stop", [RETURN, CALL])
def test_generation_stops_on_return_and_call_but_not_on_end(monkeypatch, tiny, stop):
    hello, world = tiny[1].encode("Hello"), tiny[1].encode(" world")
    responses = scripted(monkeypatch, tiny, [*hello, END, *world, stop, *hello])
    assert [r.token for r in responses] == [*hello, END, *world, stop]
    assert responses[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in responses[:-1])
    assert "".join(r.text for r in responses) == "Hello<|end|> world"


def test_generation_stops_at_max_tokens_with_length(monkeypatch, tiny):
    responses = scripted(monkeypatch, tiny, [1000] * 10, max_tokens=4)
    assert len(responses) == 4 and responses[-1].finish_reason == "length"
    stats = responses[-1].stats
    assert stats.generation_tokens == 4 and stats.prompt_tokens == 1
    assert stats.ttft > 0 and stats.prompt_tps > 0 and stats.peak_memory_gb > 0


def test_same_seed_repeats_and_another_seed_differs(tiny):
    model, tokenizer = tiny

    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed)
        return [
            r.token for r in stream_generate(model, tokenizer, "a b c", max_tokens=12, sampling=params, stop_tokens=())
        ]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_prompt_longer_than_the_context_is_refused(tiny):
    model, tokenizer = tiny
    limit = model.config.max_position_embeddings
    with pytest.raises(PromptTooLong, match=str(limit)):
        list(stream_generate(model, tokenizer, [1000] * limit, max_tokens=8))
    capped = stream_generate(model, tokenizer, [1000] * limit, max_tokens=2, max_kv_size=64)
    assert len(list(capped)) == 2  # a capped cache accepts any length


@pytest.mark.parametrize(("context", "expected"), [(64, "ABAA"), (1, "ABAB")])
def test_the_repetition_penalty_applies_through_stream_generate_to_its_recent_tokens(
    monkeypatch, tiny, context, expected
):
    """Logits A = 1.0, B = 0.9 every step, penalty 2: a penalized A (0.5) loses to B until B is penalized
    too (0.45), and with a context of 1 only the last token is penalized."""
    model, tokenizer = tiny
    a, b = 1000, 1001

    def logits(_n: int) -> torch.Tensor:
        row = torch.zeros(model.config.vocab_size)
        row[a], row[b] = 1.0, 0.9
        return row

    scripted_logits(monkeypatch, model, logits)
    params = SamplingParams(repetition_penalty=2.0, repetition_context=context)
    got = [r.token for r in stream_generate(model, tokenizer, [5, 6, 7], max_tokens=4, sampling=params)]
    assert got == [{"A": a, "B": b}[c] for c in expected]
    plain = [r.token for r in stream_generate(model, tokenizer, [5, 6, 7], max_tokens=4)]
    assert plain == [a] * 4


def test_batch_generate_keeps_prompt_order_and_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = ["one", "a much longer prompt than the first one", "three", [1000, 1001, 1002]]
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=3), SamplingParams(), SamplingParams(seed=1)]
    out = batch_generate(model, tokenizer, prompts, max_tokens=[5, 7, 3, 6], sampling=params, stop_tokens=())
    for i, p in enumerate(prompts):
        alone = [
            r.token
            for r in stream_generate(
                model, tokenizer, p, max_tokens=[5, 7, 3, 6][i], sampling=params[i], stop_tokens=()
            )
        ]
        assert out.tokens[i] == alone
        assert out.texts[i] == tokenizer.decode(alone) and out.finish_reasons[i] == "length"


def test_cli_generate_prints_answer_and_stats(tiny_checkpoint, capsys):
    assert (
        main(["generate", "-m", str(tiny_checkpoint), "-p", "Hi", "--max-tokens", "6", "--seed", "1", "--temp", "0.8"])
        == 0
    )
    out = capsys.readouterr().out
    assert "generation: 6 tokens" in out and "tok/s" in out


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["generate", "-m", str(tmp_path / "missing"), "-p", "Hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "Traceback" not in err
    assert main(["generate", "-m", str(tmp_path / "missing"), "-p", "Hi", "--top-p", "2"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_cli_synth_writes_a_loadable_checkpoint_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0
    model, _ = load(out, device="cpu")
    assert model.config.num_hidden_layers == 4
    assert main(["synth", "--preset", "tiny", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "What is the capital of France?" in out and "generation:" in out


def test_cli_chat_keeps_history_across_turns_and_exits(tiny_checkpoint, monkeypatch, capsys):
    import io

    from ossq import chat as chat_mod

    prompts = []
    real = chat_mod.stream_generate

    def spy(model, tokenizer, prompt, **kwargs):
        prompts.append(list(prompt))
        return real(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(chat_mod, "stream_generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\nsecond question\n/exit\n"))
    assert main(["chat", "-m", str(tiny_checkpoint), "--max-tokens", "4", "--reasoning-effort", "low"]) == 0
    assert len(prompts) == 2 and len(prompts[1]) > len(prompts[0])
    tokenizer = load(tiny_checkpoint, device="cpu")[1]
    assert "first question" in tokenizer.decode(prompts[1]) and "Reasoning: low" in tokenizer.decode(prompts[0])
    out = capsys.readouterr().out
    assert out.count("generation: 4 tokens") == 2
    # the second turn's prompt holds the first turn: the prefix cache gave it back
    second = [line for line in out.splitlines() if "generation: 4 tokens" in line][1]
    assert " cached)" in second and " 0 cached" not in second
