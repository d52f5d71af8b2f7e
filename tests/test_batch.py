"""Batch inference over a JSONL file of prompts: order kept, per-line overrides, harmony split, every line
checked before any work, output written atomically."""

from __future__ import annotations

import json

import pytest

from ossq.batch import run_prompts_file
from ossq.engine.generate import load, stream_generate
from ossq.engine.sampling import SamplingParams
from ossq.errors import OssqError
from ossq.harmony import Chat


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load(tiny_checkpoint, device="cpu")


def write_lines(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_output_lines_keep_the_input_order_and_equal_one_at_a_time_runs(tiny, tmp_path):
    model, tokenizer = tiny
    lines = [
        {"prompt": "a raw prompt", "max_tokens": 5},
        {
            "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "seed": 3,
            "temperature": 0.7,
        },
        {"prompt": "another, longer raw prompt than the first", "max_tokens": 3},
    ]
    src, out = write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    run_prompts_file(model, tokenizer, src, out, max_tokens=6, sampling=SamplingParams(), progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    chat = Chat(developer="be brief", reasoning_effort="medium")
    chat.add_user("hi")
    prompts = ["a raw prompt", chat.prompt_tokens(), "another, longer raw prompt than the first"]
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=3), SamplingParams()]
    for row, prompt, p, n in zip(rows, prompts, params, [5, 6, 3], strict=True):
        alone = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=n, sampling=p))
        assert row["text"] == alone and row["completion_tokens"] <= n
    assert rows[0]["analysis"] is None and isinstance(rows[1]["analysis"], str)
    assert rows[2]["finish_reason"] in ("stop", "length") and rows[2]["prompt_tokens"] > rows[0]["prompt_tokens"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "in.jsonl:2"),
        ({"text": "x"}, 'exactly one of "prompt" or "messages"'),
        ({"prompt": "x", "messages": []}, "exactly one of"),
        ({"prompt": "x", "temp": 1}, "unknown field(s) temp"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens must be a number"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"prompt": "x", "temperature": -1}, "temperature must be >= 0"),
        ({"messages": [{"role": "robot", "content": "x"}]}, '"role" in system/developer/user/assistant'),
        ({"prompt": ""}, "non-empty string"),
    ],
)
def test_a_bad_line_is_named_before_any_work_and_nothing_is_written(tiny, tmp_path, monkeypatch, line, message):
    model, tokenizer = tiny
    monkeypatch.setattr("ossq.batch.batch_generate", lambda *a, **k: pytest.fail("generated before checking"))
    src = write_lines(tmp_path / "in.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(OssqError, match="in.jsonl:2") as e:
        run_prompts_file(
            model, tokenizer, src, tmp_path / "out.jsonl", max_tokens=4, sampling=SamplingParams(), progress=False
        )
    assert message in str(e.value)
    assert list(tmp_path.iterdir()) == [src]


def test_the_cli_runs_a_prompts_file_and_writes_one_line_per_prompt(tiny_checkpoint, tmp_path, capsys):
    from ossq.cli import main

    src = write_lines(tmp_path / "in.jsonl", [{"prompt": "one"}, {"messages": [{"role": "user", "content": "hi"}]}])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "-m", str(tiny_checkpoint), "--prompts-file", str(src), "--out", str(out)]
    assert main([*argv, "--max-tokens", "3", "--kv-cache-tokens", "512", "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(r["completion_tokens"] <= 3 for r in rows)
    assert f"wrote 2 completions to {out}" in capsys.readouterr().out
    assert oct(out.stat().st_mode & 0o777) == "0o644"
