"""First use and bad input (issue 8): every flag checked before any work, every error one line naming the
flag or file, exit status 2, no traceback and nothing left behind; signals clean up; chat keeps every
reply. The real CLI runs (`main(argv)`, or a subprocess where a signal is sent) on tiny checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ossq import __version__
from ossq.cli import COMMANDS, build_parser, main
from ossq.config import REQUIRED_KEYS
from ossq.device import MemoryMeter, default_dtype, resolve_device
from ossq.errors import DeviceError, InvalidArgument
from ossq.formats.mlx import stale_staging
from ossq.synth import synthesize
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def listing(path: Path) -> list[str]:
    """Everything under `path` (hidden staging directories included), relative, sorted."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with one line on stderr holding every needle, and no traceback."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"ossq {argv[0]}: error: " if argv[0] in COMMANDS else "ossq: error: "), err
    assert "Traceback" not in err + captured.out
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ---- 1. --device -------------------------------------------------------------------------------------------
def commands(ckpt: Path, out: Path) -> dict[str, list[str]]:
    """One valid command line per subcommand that takes --device (the checkpoint is never loaded here)."""
    return {
        "generate": ["generate", "-m", str(ckpt), "-p", "hi"],
        "chat": ["chat", "-m", str(ckpt)],
        "convert": ["convert", "--hf-path", str(ckpt), "--mlx-path", str(out / "q"), "-q"],
        "bench": ["bench", "-m", str(ckpt)],
        "ppl": ["ppl", "-m", str(ckpt)],
        "synth": ["synth", "--out", str(out / "s")],
    }


@pytest.mark.parametrize("command", ["generate", "chat", "convert", "bench", "ppl", "synth"])
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "unknown device 'tpu'; available: cpu"),
        ("meta", "ossq does not run on device 'meta'"),
        pytest.param(
            "cuda",
            "device 'cuda' is not available here (torch has no CUDA); available: cpu",
            marks=pytest.mark.skipif(not NO_CUDA or torch.version.cuda is not None, reason="needs CPU torch"),
        ),
        pytest.param(
            "cuda:9", "device 'cuda:9' is not available here", marks=pytest.mark.skipif(NO_CUDA, reason="GPU")
        ),
    ],
)
def test_an_unavailable_device_is_one_line_naming_what_is_available(command, device, message, small_checkpoint,
                                                                    tmp_path, capsys):  # fmt: skip
    fails(capsys, [*commands(small_checkpoint, tmp_path)[command], "--device", device], message)
    assert listing(tmp_path) == []


def test_flags_are_checked_before_the_engine_is_imported(small_checkpoint, tmp_path):
    """In a fresh interpreter: after a batch of bad command lines, no ossq.engine module was ever imported."""
    bad = [
        [*commands(small_checkpoint, tmp_path)["generate"], "--device", "tpu"],
        ["generate", "-m", str(small_checkpoint), "-p", "hi", "--max-tokens", "0"],
        ["generate", "-m", str(tmp_path / "missing"), "-p", "hi"],
        ["chat", "-m", str(small_checkpoint), "--temp", "-1"],
        ["bench", "-m", str(small_checkpoint), "--plot", str(tmp_path / "x.txt")],
        ["ppl", "-m", str(small_checkpoint), "--stride", "9000"],
        ["ppl", "-m", str(small_checkpoint), "--doc-separator", "["],
    ]
    code = (
        "import json, sys\nfrom ossq.cli import main\n"
        f"codes = [main(a) for a in json.loads({json.dumps(json.dumps(bad))})]\n"
        "print(json.dumps([codes, sorted(m for m in sys.modules if m.startswith('ossq.engine'))]))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    codes, engine = json.loads(run.stdout.strip().splitlines()[-1])
    assert codes == [2] * len(bad) and engine == []


def test_resolve_device_default_dtype_and_the_memory_meter():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") and default_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(DeviceError, match="unknown device ''"):
        resolve_device("")
    meter = MemoryMeter("cpu")
    meter.reset()
    grown = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert meter.peak_gb() >= 64 * 2**20 / 1e9 * 0.9 and meter.peak_bytes() == pytest.approx(meter.peak_gb() * 1e9)
    del grown


# ---- 3 and 6. numeric flags: out-of-domain values are refused by name, none falls back to a default ------
NUMERIC = [
    (["convert", "--hf-path", "{ckpt}", "--mlx-path", "{out}/q", "-q", "--q-bits", "0"], "--q-bits must be one of 2"),
    (
        ["convert", "--hf-path", "{ckpt}", "--mlx-path", "{out}/q", "-q", "--q-group-size", "0"],
        "--q-group-size must be one of 32, 64, 128, got 0",
    ),
    (["convert", "--hf-path", "{ckpt}", "--mlx-path", "{out}/q", "-q", "--q-bits", "7"], "--q-bits must be one of"),
    (
        ["convert", "--hf-path", "{ckpt}", "--mlx-path", "{out}/q", "-q", "--q-mode", "mxfp4", "--q-group-size", "64"],
        "--q-group-size must be 32 with --q-mode mxfp4",
    ),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--max-tokens", "-1"], "--max-tokens must be at least 1, got -1"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--max-tokens", "ten"], "--max-tokens must be an integer, got 'ten'"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--temp", "-1"], "--temp must be >= 0 (0 means greedy), got -1.0"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--temp", "nan"], "--temp must be >= 0"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--top-k", "-1"], "--top-k must be at least 0 (0 = off), got -1"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--min-p", "1"], "--min-p must be in [0, 1)"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--seed", str(2**63)], "--seed must be from"),
    (["chat", "-m", "{ckpt}", "--max-kv-size", "0"], "--max-kv-size must be at least 1, got 0"),
    (["bench", "-m", "{ckpt}", "--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["bench", "-m", "{ckpt}", "--warmup", "-1"], "--warmup must be at least 0, got -1"),
    (["bench", "-m", "{ckpt}", "--prompt-tokens", "0"], "--prompt-tokens must be at least 1"),
    (["bench", "-m", "{ckpt}", "--gen-tokens", "1"], "--gen-tokens must be at least 2"),
    (["bench", "-m", "{ckpt}", "--context", "0"], "--context must be positive token counts"),
    (["bench", "-m", "{ckpt}", "--sweep-context", "1k,x"], "--sweep-context must be positive token counts"),
    (["bench", "-m", "{ckpt}", "--batch", "1,0"], "--batch must be positive sequence counts like 4 or 1,8,32"),
    (["bench", "-m", "{ckpt}", "--kv-cache-tokens", "0"], "--kv-cache-tokens must be at least 1"),
    (["ppl", "-m", "{ckpt}", "--window", "0"], "--window must be at least 1, got 0"),
    (["ppl", "-m", "{ckpt}", "--stride", "0"], "--stride must be at least 1, got 0"),
    (["ppl", "-m", "{ckpt}", "--max-tokens", "1"], "--max-tokens must be at least 2, got 1"),
    (["synth", "--out", "{out}/s", "--seed", "1.5"], "--seed must be an integer"),
]


@pytest.mark.parametrize(("argv", "message"), NUMERIC, ids=[" ".join(a[-2:]) for a, _ in NUMERIC])
def test_an_out_of_domain_number_is_refused_by_its_flag(argv, message, small_checkpoint, tmp_path, capsys):
    fails(capsys, [a.format(ckpt=small_checkpoint, out=tmp_path) for a in argv], message)
    assert listing(tmp_path) == []


# ---- 4. a mistyped local path is "does not exist", and the hub is named only when it was asked -----------
def test_a_mistyped_relative_path_is_a_missing_directory_not_a_hub_id(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conv" / "q4").mkdir(parents=True)
    err = fails(capsys, ["generate", "-m", "conv/q5", "-p", "hi"], "directory conv/q5 does not exist",
                "did you mean conv/q4?")  # fmt: skip
    assert "hub" not in err.lower() and "download" not in err
    err = fails(capsys, ["convert", "--hf-path", "./x", "--mlx-path", "out"], "directory ./x does not exist")
    assert "hub" not in err.lower()
    fails(capsys, ["convert", "--hf-path", "~/surely-not-here-ossq", "--mlx-path", "out"], "does not exist")
    assert listing(tmp_path) == ["conv", "conv/q4"]


def test_an_offline_hub_id_says_the_directory_does_not_exist_and_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(capsys, ["convert", "--hf-path", "openai/not-a-model-ossq", "--mlx-path", "out"],
          "directory openai/not-a-model-ossq does not exist (HF_HUB_OFFLINE is set")  # fmt: skip
    assert listing(tmp_path) == []


def test_a_hub_that_cannot_be_reached_is_named_as_tried(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*_args, **_kwargs):
        raise LocalEntryNotFoundError("ConnectError: [Errno -2] Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    fails(capsys, ["convert", "--hf-path", "openai/gpt-oss-20b", "--mlx-path", "out"],
          "directory openai/gpt-oss-20b does not exist, and the Hugging Face hub could not be reached")  # fmt: skip
    assert listing(tmp_path) == []


# ---- 5. config.json: shape keys required, model_type checked --------------------------------------------
@pytest.mark.parametrize("key", [*REQUIRED_KEYS, "model_type"])
def test_a_config_missing_a_required_key_names_it_and_the_file(key, small_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((small_checkpoint / "config.json").read_text())
    del config[key]
    (src / "config.json").write_text(json.dumps(config))
    fails(capsys, ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "-q"],
          f"{src}/config.json: missing required key {key}")  # fmt: skip
    fails(capsys, ["generate", "-m", str(src), "-p", "hi"], f"missing required key {key}")
    assert listing(tmp_path) == ["src", "src/config.json"]


def test_a_config_of_another_model_type_is_refused(small_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((small_checkpoint / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    fails(capsys, ["bench", "-m", str(src)], "model_type 'llama' is not gpt-oss")


# ---- 7. signals during convert: nothing written, the staging directory removed; stale ones found ---------
@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """Big enough (≈100M expert weights) that `convert -q --experts quantize` writes for a couple of seconds."""
    config = small_config(hidden_size=512, intermediate_size=512, num_local_experts=32)
    return synthesize(tmp_path_factory.mktemp("slow") / "slow", config=config, seed=2)


def start_convert(src: Path, dest: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "ossq.cli", "convert", "--hf-path", str(src), "--mlx-path", str(dest), "-q",
            "--experts", "quantize"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def wait_for_staging(proc: subprocess.Popen, dest: Path, timeout: float = 60) -> Path:
    """The hidden staging directory once the writer has put shard bytes in it (mid-way, not at the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for tmp in dest.parent.glob(f".{dest.name}.*.tmp"):
            if any(f.stat().st_size > 1 << 20 for f in tmp.glob("*.safetensors")):
                return tmp
        time.sleep(0.02)
    raise AssertionError("the conversion never started writing")


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_mid_conversion_removes_the_staging_directory_and_says_nothing_was_written(
    signum, status, slow_checkpoint, tmp_path
):
    dest = tmp_path / "q4"
    proc = start_convert(slow_checkpoint, dest)
    wait_for_staging(proc, dest)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert err.strip().splitlines()[-1] == "ossq convert: interrupted, nothing written"
    assert "Traceback" not in err
    assert listing(tmp_path) == []


def test_a_killed_conversions_staging_directory_is_removed_by_the_next_run(
    slow_checkpoint, small_checkpoint, tmp_path, capsys
):
    dest = tmp_path / "q4"
    proc = start_convert(slow_checkpoint, dest)
    staging = wait_for_staging(proc, dest)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate(timeout=60)
    assert staging.is_dir() and stale_staging(dest) == [staging] and not dest.exists()
    assert main(["convert", "--hf-path", str(small_checkpoint), "--mlx-path", str(dest), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"removed {staging}" in out.replace("\n", "")
    assert not staging.exists() and (dest / "model.safetensors").is_file()


def test_a_signal_landing_in_third_party_code_is_raised_at_the_next_line_ossq_runs():
    """numpy and torch turn an exception raised inside their protocol probes into a ValueError, and a
    `__del__` swallows one: the stop must surface in ossq's own code (tests/ stands for third-party)."""
    from ossq.cli import Stopped, _int_in, _StopSignals

    stops = _StopSignals(())
    landed = []

    class Probe:
        def __int__(self):
            stops._handler(signal.SIGTERM, sys._getframe())  # must not raise here
            landed.append(True)
            return 5

    tracer = sys.gettrace()  # a coverage tool's, say: it must survive
    with stops, pytest.raises(Stopped) as stopped:
        _int_in(0)(Probe())  # ossq's parser calls int(), which calls back into "third-party" code
    assert landed == [True] and stopped.value.signum == signal.SIGTERM == stops.signum
    assert sys.gettrace() is tracer


def test_a_live_writers_staging_directory_is_never_taken_for_stale(tmp_path):
    dest = tmp_path / "q4"
    live = tmp_path / f".q4.{os.getpid()}.0123abcd.tmp"
    dead = tmp_path / ".q4.999999999.0123abcd.tmp"  # no such pid
    old = tmp_path / ".q4.89abcdef.tmp"  # an older ossq's, without a pid
    for d in (live, dead, old, tmp_path / ".other.999999999.0123abcd.tmp"):
        d.mkdir()
    assert stale_staging(dest) == sorted([dead, old])


# ---- 8. messages name the flags the user typed, not Python parameters --------------------------------------
def test_messages_name_flags_not_python_parameters(small_checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    err = fails(capsys, ["convert", "--hf-path", str(small_checkpoint), "--mlx-path", str(tmp_path / "out"), "-q"],
                "already exists; choose another path or pass --force")  # fmt: skip
    err += fails(capsys, ["convert", "--hf-path", str(small_checkpoint), "--mlx-path", str(tmp_path / "x"),
                          "--experts", "quantize"], "--experts quantize needs -q")  # fmt: skip
    err += fails(capsys, ["convert", "--hf-path", str(small_checkpoint), "--mlx-path", str(tmp_path / "x"), "-q",
                          "--quant-predicate", "tiered", "--q-bits", "4"], "drop --q-bits")  # fmt: skip
    err += fails(capsys, ["synth", "--out", str(tmp_path / "out")], "pass --force")
    assert "force=True" not in err and "experts='quantize'" not in err and "overwrite" not in err
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize(
    ("name", "message", "shown"),
    [
        ("temperature", "temperature must be >= 0 (0 means greedy), got -1.0", "--temp must be >= 0"),
        ("temperature", "SamplingParams.temperature=-1.0 must be >= 0", "--temp must be >= 0"),
        ("top_p", "top_p must be in (0, 1], got 2", "--top-p must be in (0, 1], got 2"),
        ("gen_tokens", "gen_tokens must be at least 2, got 1", "--gen-tokens must be at least 2"),
        ("kv_cache_tokens", "kv_cache_tokens must be at least 16, got 8", "--kv-cache-tokens must be at least 16"),
        ("models", "give at least one model", "-m give at least one model"),
    ],
)
def test_a_library_invalid_argument_is_shown_with_the_flag(name, message, shown, small_checkpoint, monkeypatch,
                                                           capsys):  # fmt: skip
    from ossq import cli

    def reject(_args):
        raise InvalidArgument(name, message)

    monkeypatch.setitem(cli.COMMANDS, "generate", reject)
    err = fails(capsys, ["generate", "-m", str(small_checkpoint), "-p", "hi"], f"ossq generate: error: {shown}")
    assert f"{name}=" not in err and "SamplingParams" not in err


# ---- 10. chat: Ctrl-C stops a reply, every reply is kept, output streams ------------------------------------
class Response:
    def __init__(self, token: int, text: str, finish: str | None = None) -> None:
        self.token, self.text, self.finish_reason, self.stats = token, text, finish, None


def harmony_tokens(text: str) -> list[int]:
    from ossq.harmony import encoding

    return encoding().encode(text, allowed_special="all")


def scripted_chat(monkeypatch, replies, inputs):
    """Replace the engine by scripted token streams and the prompt by `inputs` (strings, or exceptions to
    raise); returns the prompts the model was given and the console text."""
    import io

    from rich.console import Console

    from ossq import chat as chat_mod
    from ossq.harmony import encoding

    prompts, file = [], io.StringIO()
    replies = iter(replies)

    def stream(model, tokenizer, prompt, **kwargs):
        prompts.append(encoding().decode(list(prompt)))
        for item in next(replies):
            if isinstance(item, BaseException):
                raise item
            yield Response(item, encoding().decode([item]))

    pending = iter(inputs)

    def fake_input(prompt=""):
        file.write(prompt)
        item = next(pending)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(chat_mod, "stream_generate", stream)
    monkeypatch.setattr(chat_mod, "format_stats", lambda s: "stats line")
    monkeypatch.setattr("builtins.input", fake_input)
    return prompts, file, Console(file=file, width=100, highlight=False)


def test_ctrl_c_during_a_reply_stops_it_keeps_it_and_the_chat_goes_on(monkeypatch):
    from ossq.chat import interactive
    from ossq.harmony import Chat

    first = harmony_tokens("<|channel|>final<|message|>Paris is the")
    second = harmony_tokens("<|channel|>final<|message|>Yes.<|return|>")
    prompts, out, console = scripted_chat(
        monkeypatch, [[*first, KeyboardInterrupt()], second], ["capital of France?", "sure?", "/exit"]
    )
    interactive(None, None, Chat(), console=console, sampling=None, max_tokens=16)
    text = out.getvalue()
    assert "Paris is the\n[interrupted]" in text and "Yes." in text
    assert len(prompts) == 2 and "Paris is the" in prompts[1]  # the interrupted reply is in the history


def test_ctrl_c_at_the_prompt_clears_the_line_and_a_second_one_leaves(monkeypatch):
    from ossq.chat import interactive
    from ossq.harmony import Chat

    reply = harmony_tokens("<|channel|>final<|message|>Hi.<|return|>")
    prompts, out, console = scripted_chat(
        monkeypatch, [reply], [KeyboardInterrupt(), "hello", KeyboardInterrupt(), KeyboardInterrupt()]
    )
    interactive(None, None, Chat(), console=console, sampling=None, max_tokens=16)
    assert len(prompts) == 1 and "(Ctrl-C again, /exit or Ctrl-D to leave)" in out.getvalue()
    assert "readline" in sys.modules or sys.platform == "win32"  # line editing and history for input()


def test_a_reply_that_is_not_harmony_streams_raw_and_is_kept_in_the_history(monkeypatch):
    from ossq.chat import RAW_AFTER_TOKENS, answer
    from ossq.harmony import Chat

    noise = harmony_tokens(" lorem ipsum" * RAW_AFTER_TOKENS)
    seen: list[str] = []
    prompts, out, console = scripted_chat(monkeypatch, [noise, []], [])

    from ossq import chat as chat_mod

    inner = chat_mod.stream_generate

    def watching(*args, **kwargs):
        for i, response in enumerate(inner(*args, **kwargs)):
            seen.append(out.getvalue())
            if i == RAW_AFTER_TOKENS + 5:
                assert "lorem ipsum" in seen[-1]  # printed while the reply is still streaming
            yield response

    monkeypatch.setattr(chat_mod, "stream_generate", watching)
    chat = Chat()
    chat.add_user("hi")
    answer(None, None, chat, sampling=None, max_tokens=512, console=console)
    assert "[raw, not harmony]" in out.getvalue()
    chat.add_user("again")
    assert "lorem ipsum lorem ipsum" in harmony_decode(chat.prompt_tokens())


def harmony_decode(tokens: list[int]) -> str:
    from ossq.harmony import encoding

    return encoding().decode(tokens)


def test_cli_chat_ctrl_c_stops_only_the_reply(tiny_checkpoint, monkeypatch, capsys):
    import io

    from ossq import chat as chat_mod

    real, prompts = chat_mod.stream_generate, []

    def interrupted_after_two(model, tokenizer, prompt, **kwargs):
        prompts.append(list(prompt))
        for n, response in enumerate(real(model, tokenizer, prompt, **kwargs)):
            if n == 2 and len(prompts) == 1:
                raise KeyboardInterrupt
            yield response

    monkeypatch.setattr(chat_mod, "stream_generate", interrupted_after_two)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n/exit\n"))
    assert main(["chat", "-m", str(tiny_checkpoint), "--max-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("[interrupted]") == 1 and len(prompts) == 2 and len(prompts[1]) > len(prompts[0])


# ---- 11. --version, --help, file modes, the dry-run table, pyproject ------------------------------------
def test_version_and_every_help_entry_has_a_description_and_its_default(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"ossq {__version__}"
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, (name, action.dest)
            if action.option_strings and action.default not in (None, False, "==SUPPRESS==") and action.dest != "help":
                formatted = sub.formatter_class("x")._get_help_string(action)
                assert "default" in formatted, (name, action.dest)
        assert main([name, "--help"]) == 0
        assert "(default: " in capsys.readouterr().out or name == "quickstart"


def test_synthesized_files_are_world_readable_like_the_directory(tmp_path, capsys):
    out = tmp_path / "s"
    config = small_config(num_hidden_layers=1, num_local_experts=2)
    synthesize(out, config=config, max_shard_bytes=100_000)
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(modes) > 4 and set(modes.values()) == {0o644}, modes


def test_dry_run_counts_the_sinks_parameters(small_checkpoint, tmp_path, capsys):
    assert main(["convert", "--hf-path", str(small_checkpoint), "--mlx-path", str(tmp_path / "q"), "-q",
                 "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    sinks = next(line for line in out.splitlines() if line.startswith("│ sinks"))
    cells = [c.strip() for c in sinks.split("│")[1:-1]]
    assert cells[5] == "16" and cells[6] == "32 B"  # 4 layers × 4 heads, bf16
    assert "leaves out the 16 attention sinks" in " ".join(out.split())
    assert listing(tmp_path) == []


def test_pyproject_uses_the_spdx_license_string():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"


def test_the_quickstart_titles_fit_a_narrow_terminal():
    import io

    from rich.console import Console

    from ossq.quickstart import _title

    file = io.StringIO()
    _title(Console(file=file, width=60), "1. chat with the tiny model", "a detail " * 12)
    assert "1. chat with the tiny model" in file.getvalue() and "…" not in file.getvalue()


# ---- more bad input, as a new user would type it -----------------------------------------------------------
@pytest.fixture
def junk(tmp_path, small_checkpoint):
    """Paths a user might mistype into, made inside tmp_path/in (tmp_path/out stays for outputs)."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("text")
    (d / "nocfg").mkdir()
    (d / "list").mkdir()
    (d / "list" / "config.json").write_text("[1, 2]")
    (d / "dircfg" / "config.json").mkdir(parents=True)
    (d / "notjson").mkdir()
    (d / "notjson" / "config.json").write_text("{oops")
    (d / "badkey.json").write_text(json.dumps({"default": {"bits": 4}, "colour": "red"}))
    (d / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    return d


EXTRA = [
    (["convert", "--hf-path", "{in}/nocfg", "--mlx-path", "{out}/q"], "{in}/nocfg: no config.json"),
    (["convert", "--hf-path", "{in}/list", "--mlx-path", "{out}/q"], "{in}/list/config.json: expected a JSON object"),
    (["convert", "--hf-path", "{in}/dircfg", "--mlx-path", "{out}/q"], "{in}/dircfg/config.json: cannot read it"),
    (["convert", "--hf-path", "{in}/notjson", "--mlx-path", "{out}/q"], "config.json: not valid JSON"),
    (["convert", "--hf-path", "{in}/empty.txt", "--mlx-path", "{out}/q"], "is a file; pass the checkpoint directory"),
    (["convert", "--hf-path", "{ckpt}", "--mlx-path", "{ckpt}"], "must not be the source checkpoint"),
    (["convert", "--hf-path", "{ckpt}", "--mlx-path", "{ckpt}/sub", "-q"], "must not be the source checkpoint"),
    (["convert", "--hf-path", "{ckpt}", "--mlx-path", "{in}/empty.txt/q", "-q"], "empty.txt is a file"),
    (["convert", "--hf-path", "{ckpt}", "--mlx-path", "{in}/empty.txt", "--force"], "--mlx-path names the directory"),
    (
        ["convert", "--hf-path", "{ckpt}", "--mlx-path", "{out}/q", "-q", "--quant-predicate", "{in}/badkey.json"],
        "unknown key(s) ['colour']",
    ),
    (
        ["convert", "--hf-path", "{ckpt}", "--mlx-path", "{out}/q", "-q", "--quant-predicate", "{in}/none.toml"],
        "cannot read the recipe file",
    ),
    (["convert", "--hf-path", "{ckpt}", "--mlx-path", "{out}/q", "-q", "-d"], "not both"),
    (["convert", "--hf-path", "", "--mlx-path", "{out}/q"], "--hf-path must not be empty"),
    (["synth", "--out", "{in}/empty.txt/s"], "empty.txt is a file"),
    (["synth", "--out", "{in}/empty.txt", "--force"], "--out names the directory"),
    (["synth", "--preset", "7b", "--out", "{out}/s"], "--preset: invalid choice: '7b'"),
    (["generate", "-m", "{ckpt}", "-p", ""], "--prompt is empty"),
    (["generate", "-m", "{ckpt}", "-p", "-"], "--prompt - read nothing from standard input"),
    (["generate", "-m", "{ckpt}"], "one of the arguments -p/--prompt --prompts-file is required"),
    (["generate", "-m", "{ckpt}", "--prompts-file", "{in}/prompts.jsonl"], "--prompts-file needs --out"),
    (["generate", "-m", "{ckpt}", "--prompts-file", "{in}/none.jsonl", "--out", "{out}/o"], "no such file"),
    (
        ["generate", "-m", "{ckpt}", "--prompts-file", "{in}/prompts.jsonl", "--out", "{out}/missing/o.jsonl"],
        "does not exist",
    ),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--out", "{out}/o.jsonl"], "--out applies only with --prompts-file"),
    (["generate", "-m", "{in}/nocfg", "-p", "hi"], "no config.json"),
    (["chat", "-m", "{in}/empty.txt"], "is a file"),
    (["chat", "-m", "{ckpt}", "--reasoning-effort", "max"], "--reasoning-effort: invalid choice"),
    (["bench", "-m", "{ckpt}", "-m", "{in}/nocfg"], "{in}/nocfg: no config.json"),
    (["bench", "-m", "{ckpt}", "--json", "{in}/empty.txt/r.json"], "--json {in}/empty.txt/r.json: "),
    (["bench", "-m", "{ckpt}", "--json", "{in}"], "--json {in} is a directory"),
    (["bench", "-m", "{ckpt}", "--plot", "{out}/r.txt"], "--plot {out}/r.txt: name a .png"),
    (["bench", "-m", "{ckpt}", "--json", "{out}/r", "--markdown", "{out}/r"], "name the same file"),
    (["ppl", "-m", "{ckpt}", "--stride", "5000"], "--stride must be at most --window (4096), got 5000"),
    (["ppl", "-m", "{ckpt}", "--window", "8192"], "--window (8192 tokens) exceeds the context of {ckpt}: 4096"),
    (["bench", "-m", "{ckpt}", "--prompt-tokens", "4000"], "--prompt-tokens + --gen-tokens (4200 tokens) exceeds"),
    (["generate", "-m", "{ckpt}", "-p", "hi", "--max-tokens", "5000"], "--max-tokens (5000 tokens) exceeds the"),
    (["ppl", "-m", "{ckpt}", "--doc-separator", "["], "--doc-separator '[' is not a regular expression"),
    (["ppl", "-m", "{ckpt}", "--doc-separator", "\\s*"], "matches the empty string"),
    (["ppl", "-m", "{ckpt}", "--data", "{in}/empty.txt"], "--data {in}/empty.txt is empty"),
    (["ppl", "-m", "{ckpt}", "--data", "{in}/missing.txt"], "--data {in}/missing.txt: no such file or directory"),
    (["ppl", "-m", "{ckpt}", "--data", "{in}/nocfg"], "no .txt or .jsonl files"),
    (["ppl", "-m", "{ckpt}", "--reference", "{in}/nocfg"], "--reference '{in}/nocfg' is not one of the -m models"),
    (["ppl", "-m", "{ckpt}", "--kl-reference", "{in}/gone"], "--kl-reference: directory {in}/gone does not exist"),
    (["quickstart", "--cache-dir", "{in}/empty.txt"], "--cache-dir {in}/empty.txt is a file"),
    (["nonsense"], "invalid choice: 'nonsense'"),
]


@pytest.mark.parametrize(("argv", "message"), EXTRA, ids=[" ".join(a)[:60] for a, _ in EXTRA])
def test_more_bad_input_is_one_line_and_leaves_nothing(argv, message, junk, small_checkpoint, tmp_path, monkeypatch,
                                                       capsys):  # fmt: skip
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    before = listing(tmp_path)
    names = {"in": junk, "out": tmp_path / "out", "ckpt": small_checkpoint}
    argv = [a.format(**names) for a in argv]
    fails(capsys, argv, message.format(**names))
    assert listing(tmp_path) == before
    shutil.rmtree(junk)
