"""The `ossq` command. Each subcommand parses flags named like the library parameters and calls one
library function.

Every flag is checked before anything slow happens (no engine import, no model load, no download): a
value outside its domain, a missing file or model directory, an unwritable output, an unavailable
device. An error the user can fix prints one line, `ossq <command>: error: …` naming the flag or file,
and exits with status 2; no traceback, nothing left behind. SIGTERM and SIGHUP (and, while a checkpoint
is being written, SIGINT) become exceptions, so the writers' cleanup runs; the exit status is then
128 + the signal number (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ossq import __version__
from ossq.errors import DeviceError, InvalidArgument, OssqError
from ossq.lengths import parse_lengths

REASONING_EFFORTS = ("low", "medium", "high")
# Python parameter → flag, where the flag is not simply "--" + the name with dashes.
PARAM_FLAGS = {
    "temperature": "--temp",
    "models": "-m",
    "json_path": "--json",
    "markdown_path": "--markdown",
    "plot_path": "--plot",
    "hf_path": "--hf-path",
    "mlx_path": "--mlx-path",
    "overwrite": "--force",
}
SEED_RANGE = (-(2**63), 2**63 - 1)  # what SamplingParams and torch generators accept
WRITERS = ("convert", "synth")  # commands that publish a directory; they also take SIGINT as a stop signal


# ---- flag types: argparse calls them; their errors name the flag --------------------------------------
def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _int_in(low: int, high: int | None = None, note: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _integer(text)
        if value < low or (high is not None and value > high):
            rule = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {rule}{note}, got {value}")
        return value

    return parse


def _float_in(rule: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value

    return parse


def _seed(text: str) -> int:
    return _int_in(*SEED_RANGE)(text)


def _lengths(text: str) -> list[int]:
    """ "2k" or "1k,4k" (k = 1024) → [2048] or [1024, 4096]."""
    try:
        return parse_lengths(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be positive token counts like 2048 or 2k (k = 1024), got {text!r}"
        ) from None


def _batch_sizes(text: str) -> list[int]:
    """ "4" or "1,8,32" → [4] or [1, 8, 32]."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"must be positive sequence counts like 4 or 1,8,32, got {text!r}")
    return [int(part) for part in parts]


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# ---- the parser ---------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        message = re.sub(r"^argument ([^:]+): (must )", r"\1 \2", message)
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help plus "(default: X)" for every option whose default is a value worth stating."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS:
            return text
        if "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _sub(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)


def _add_device(p: argparse.ArgumentParser, help_text: str = "cpu or cuda[:N] (default: cuda when available)") -> None:
    p.add_argument("--device", default=None, help=help_text)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_int_in(1), default=512, help="tokens to generate at most")
    p.add_argument(
        "--temp",
        type=_float_in(">= 0 (0 means greedy)", lambda v: v >= 0),
        default=0.0,
        help="sampling temperature; 0 = greedy",
    )
    p.add_argument(
        "--top-p",
        type=_float_in("in (0, 1] (1 = off)", lambda v: 0 < v <= 1),
        default=1.0,
        help="nucleus sampling: keep the most probable tokens up to this mass (1 = off)",
    )
    p.add_argument(
        "--top-k", type=_int_in(0, note=" (0 = off)"), default=0, help="keep only the k most probable tokens (0 = off)"
    )
    p.add_argument(
        "--min-p",
        type=_float_in("in [0, 1) (0 = off)", lambda v: 0 <= v < 1),
        default=0.0,
        help="drop tokens less probable than this fraction of the top one (0 = off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=_float_in("> 0 (1 = off)", lambda v: v > 0),
        default=1.0,
        help="divide the logits of recent tokens by this (1 = off)",
    )
    p.add_argument("--seed", type=_seed, default=None, help="seed for reproducible sampling (default: random)")
    p.add_argument(
        "--max-kv-size",
        type=_int_in(1),
        default=None,
        help="cap the keys a full-attention layer keeps (a rotating cache, as mlx-lm's option; default: no cap)",
    )


def _add_engine(
    p: argparse.ArgumentParser,
    *,
    prefix_cache: bool = True,
    max_num_seqs: bool = True,
    kv_default: str = "most of the free GPU memory, or 32768 on CPU",
) -> None:
    """The engine's flags (docs/engine.md); bench sets the prefix cache and sequence count itself."""
    p.add_argument(
        "--kv-cache-tokens",
        type=_int_in(16, note=" (one 16-token block)"),
        default=None,
        help=f"tokens the paged KV pool holds (default: {kv_default})",
    )
    if max_num_seqs:
        p.add_argument("--max-num-seqs", type=_int_in(1), default=64, help="sequences run at once, at most")
    if prefix_cache:
        p.add_argument(
            "--no-prefix-cache",
            dest="prefix_cache",
            action="store_false",
            help="compute every prompt in full instead of reusing the cached blocks of earlier ones",
        )
    p.add_argument("--ops", default=None, help="op implementation: torch, cpu or triton (default: the device's)")
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="launch every decode step's kernels one by one instead of replaying CUDA graphs (for comparison)",
    )
    p.add_argument(
        "--no-overlap",
        dest="overlap",
        action="store_const",
        const=False,
        default=None,
        help="book each decode step before launching the next, instead of while the device runs it (for comparison)",
    )


def _add_tp(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tp",
        type=_int_in(1),
        default=1,
        help="split the model over this many ranks (tensor parallel: one GPU each on CUDA, processes on CPU; "
        "docs/engine.md)",
    )
    p.add_argument(
        "--ep",
        type=_int_in(1),
        default=1,
        help="expert parallel for throughput: the experts split over this many ranks, attention and the "
        "vocabulary whole on each, every rank running its own share of the requests (docs/engine.md)",
    )
    p.add_argument(
        "--ep-placement",
        default=None,
        metavar="FILE",
        help="with --ep: place each layer's experts to balance the routing recorded by `ossq bench --ep ... "
        "--json FILE` (or a JSON routing histogram or placement; docs/engine.md)",
    )


def _add_speculative(p: argparse.ArgumentParser) -> None:
    """Speculative decoding, under mlx-lm's flag names (docs/engine.md)."""
    p.add_argument(
        "--draft-model",
        default=None,
        help="speculative decoding: a checkpoint with the same tokenizer drafts tokens that -m verifies, or "
        "'ngram' drafts by prompt lookup (output unchanged; default: no speculation)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=_int_in(1),
        default=3,
        help="draft tokens per step at most (fewer while they are rarely accepted)",
    )


def _engine_config(args: argparse.Namespace):
    from ossq.engine.engine import EngineConfig

    return EngineConfig(
        kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=args.max_num_seqs,
        max_kv_size=getattr(args, "max_kv_size", None),
        prefix_cache=getattr(args, "prefix_cache", True),
        cuda_graphs=args.cuda_graphs,
        overlap=args.overlap,
    )


def _add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--system", default=None, help="model identity line of the system message (default: harmony's)")
    p.add_argument("--developer", default=None, help="developer instructions (default: none)")
    p.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default="medium", help="how long the model thinks")
    p.add_argument("--hide-reasoning", action="store_true", help="print only the final answer")
    _add_device(p)
    _add_sampling(p)
    _add_engine(p)
    _add_speculative(p)


def _add_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_path", type=Path, help="write the report as JSON to this file")
    p.add_argument("--markdown", dest="markdown_path", type=Path, help="write a Markdown report for a model card")
    p.add_argument(
        "--plot",
        dest="plot_path",
        type=Path,
        help="write bar charts to this .png (or .pdf, .svg) file; needs matplotlib",
    )


def _add_convert(sub) -> None:
    p = _sub(sub, "convert", "quantize a checkpoint into the MLX format (mlx_lm.convert's flags)")
    p.add_argument("--hf-path", required=True, type=_nonempty, help="source: checkpoint directory or hub id")
    p.add_argument("--mlx-path", required=True, type=Path, help="destination directory (must not exist)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (4-bit, group 64 unless told otherwise)")
    p.add_argument("--q-bits", type=_integer, default=None, help="bits per weight: 2, 3, 4, 5, 6 or 8 (default: 4)")
    p.add_argument(
        "--q-group-size", type=_integer, default=None, help="weights per scale: 32, 64 or 128 (default: 64; mxfp4: 32)"
    )
    p.add_argument("--q-mode", default="affine", choices=("affine", "mxfp4"), help="quantization mode")
    p.add_argument(
        "--quant-predicate",
        default=None,
        type=_nonempty,
        help="recipe: mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6, tiered, mxfp4-experts, or a "
        ".toml/.json file (default: uniform)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float16", "bfloat16", "float32"),
        help="cast floating tensors (default: the config's torch_dtype, else as stored)",
    )
    p.add_argument("-d", "--dequantize", action="store_true", help="write an unquantized (bf16) checkpoint")
    p.add_argument(
        "--experts",
        default="keep",
        choices=("keep", "quantize"),
        help="MXFP4 experts of the source: keep them (mlx-lm's choice) or quantize them too",
    )
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--dry-run", action="store_true", help="print the per-tensor plan and size, write nothing")
    p.add_argument("--calibrate", default=None, choices=("gptq", "awq"), help="calibrated rounding over --calib-data")
    p.add_argument("--calib-data", default=None, help="calibration text: a file, a directory or a dataset name")
    p.add_argument("--calib-tokens", type=_int_in(16), default=4096, help="calibration tokens (default: 4096)")
    p.add_argument(
        "--target-bpw",
        type=_float_in("a positive number", lambda v: v > 0),
        default=None,
        help="choose bits and group sizes per tensor to hit this many bits per weight (needs --calib-data; "
        "kept experts stay as stored, --experts quantize lets it choose theirs too)",
    )
    p.add_argument(
        "--max-bits",
        type=int,
        default=None,
        help="with --target-bpw: no tensor above this many bits (2, 3, 4, 5, 6 or 8; default: up to bf16)",
    )
    p.add_argument(
        "--distill",
        type=_int_in(1),
        default=0,
        metavar="STEPS",
        help="then tune the affine scales and biases for STEPS steps to match the source's next-token "
        "distributions on --calib-data (DWQ; ~200-500 steps, more --calib-tokens help)",
    )
    p.add_argument(
        "--distill-lr",
        type=_float_in("a positive number", lambda v: v > 0),
        default=1e-3,
        help="--distill's Adam learning rate, relative to each scale (default: 1e-3)",
    )
    _add_device(p, "quantize on this device: cpu or cuda[:N] (default: cpu; cuda is faster, same bits)")


def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        dest="models",
        action="append",
        required=True,
        help="checkpoint directory or hub id (repeat to compare)",
    )


def _add_bench(sub) -> None:
    p = _sub(sub, "bench", "batch-1 speed of one or more checkpoints, side by side")
    _add_models(p)
    _add_tp(p)
    p.add_argument("--prompt-tokens", type=_int_in(1), default=90, help="prompt length of the main measurement")
    p.add_argument(
        "--gen-tokens",
        type=_int_in(2, note=" (the decode rate needs a step)"),
        default=200,
        help="tokens generated per run",
    )
    p.add_argument(
        "--context",
        action="append",
        type=_lengths,
        default=None,
        help="extra context lengths measured as columns, e.g. 2k or 1k,4k (k = 1024; default: none)",
    )
    p.add_argument(
        "--sweep-context",
        type=_lengths,
        default=None,
        help="lengths for the tok/s-vs-context plot, e.g. 1k,4k,16k (default: none)",
    )
    p.add_argument(
        "--batch",
        type=_batch_sizes,
        default=None,
        help="batch sizes measured as extra columns, e.g. 4 or 1,8,32 (default: none)",
    )
    p.add_argument("--repeats", type=_int_in(1), default=5, help="timed runs per measurement (median, min, max)")
    p.add_argument("--warmup", type=_int_in(0), default=1, help="untimed runs before them")
    _add_device(p)
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random prompt tokens")
    _add_engine(p, prefix_cache=False, max_num_seqs=False, kv_default="what the largest measurement needs")
    _add_speculative(p)
    _add_outputs(p)


def _add_ppl(sub) -> None:
    p = _sub(sub, "ppl", "perplexity (and KL vs a reference) of one or more checkpoints")
    _add_models(p)
    p.add_argument(
        "--data",
        default=None,
        type=_nonempty,
        help="text/JSONL file, directory, or a Hugging Face dataset name[:config[:split]] "
        "(default: WikiText-2 raw test, needs the network and `datasets`)",
    )
    p.add_argument(
        "--doc-separator",
        default=None,
        help="regular expression splitting a text file into documents, e.g. '\\n\\s*\\n' "
        "(default: one document per file)",
    )
    p.add_argument("--window", type=_int_in(1), default=4096, help="tokens per forward pass")
    p.add_argument(
        "--stride",
        type=_int_in(1),
        default=None,
        help="tokens between window starts, at most the window (default: the window)",
    )
    p.add_argument("--max-tokens", type=_int_in(2), default=100_000, help="tokens of the data to score at most")
    p.add_argument(
        "--eos-between-docs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="put <|endoftext|> between documents",
    )
    p.add_argument("--reference", default=None, help="one of the -m models; changes in %% are relative to it")
    p.add_argument("--kl-reference", default=None, help="model whose distribution KL is measured against")
    _add_device(p)
    p.add_argument("--ops", default=None, help="op implementation: torch, cpu or triton (default: the device's)")
    _add_outputs(p)


def _add_serve(sub) -> None:
    p = _sub(sub, "serve", "an OpenAI-compatible HTTP server: chat completions, responses, completions (docs/serve.md)")
    p.add_argument("-m", "--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_int_in(0, 65535, " (0 = any free port)"), default=8080, help="port to listen on")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OSSQ_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $OSSQ_API_KEY, else no key)",
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the -m name)")
    p.add_argument(
        "--max-queue",
        type=_int_in(0),
        default=256,
        help="requests that may wait beyond --max-num-seqs running ones; past that, 429",
    )
    p.add_argument(
        "--max-kv-size",
        type=_int_in(1),
        default=None,
        help="cap the keys a full-attention layer keeps (a rotating cache, as mlx-lm's option; default: no cap)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info", help="log detail")
    p.add_argument(
        "--tp",
        type=_int_in(1),
        default=1,
        help="split the model over this many ranks (tensor parallel: one GPU each on CUDA, processes on CPU); "
        "rank 0 serves HTTP and every rank runs its engine's steps (docs/serve.md)",
    )
    p.add_argument(
        "--dp",
        type=_int_in(1),
        default=1,
        help="serve this many engine replicas (one GPU each on CUDA), each request routed to the one whose "
        "prefix cache holds most of its prompt (docs/serve.md)",
    )
    _add_device(p)
    _add_engine(p)
    _add_speculative(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ossq", description="gpt-oss: convert, run and measure.", formatter_class=_HelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"ossq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = _sub(sub, "generate", "answer one prompt (harmony chat format), or every line of a prompts file")
    _add_chat(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--prompt", help="the user message ('-' reads standard input)")
    source.add_argument(
        "--prompts-file",
        type=Path,
        help="JSONL of prompts run as one batch (ossq/batch.py describes the lines); needs --out",
    )
    p.add_argument("--out", type=Path, help="with --prompts-file: the JSONL file to write the completions to")
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat format")
    _add_tp(p)

    _add_chat(_sub(sub, "chat", "interactive multi-turn chat in the terminal"))

    p = _sub(sub, "synth", "write a random gpt-oss checkpoint in the published layout")
    p.add_argument("--preset", default="tiny", choices=("tiny", "20b", "120b"), help="model shape")
    p.add_argument("--out", required=True, type=Path, help="directory to create")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random weights")
    _add_device(p, "where to draw the random weights: cpu or cuda[:N] (default: cpu; cuda is faster)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")

    _add_convert(sub)
    _add_bench(sub)
    _add_ppl(sub)
    _add_serve(sub)

    p = _sub(sub, "quickstart", "synthesize a tiny model and chat with it: a smoke test of the install")
    p.add_argument("--cache-dir", type=Path, default=None, help="where to keep the tiny model (default: ossq's cache)")
    return parser


# ---- checks that need more than one flag, or the file system ------------------------------------------
def _usage(flag: str, message: str) -> InvalidArgument:
    return InvalidArgument(flag, f"{flag} {message}")


def _check_device(args: argparse.Namespace) -> None:
    from ossq.device import resolve_device

    if getattr(args, "device", None) is not None:
        args.device = str(resolve_device(args.device))


def _check_model(flag: str, name: str, *, span: tuple[str, int] | None = None) -> None:
    """A local-looking model must be a directory with a readable gpt-oss config.json, and its context must
    hold `span` = (the flags that add up to it, tokens); a hub id is left to the command (it may be
    downloaded). Errors name the file, and `flag` unless it is the plain -m."""
    from ossq.formats.hf import local_checkpoint, read_model_config

    try:
        root = local_checkpoint(name)
        if root is None:
            return
        _, config = read_model_config(root)  # a missing or broken config.json, named
    except OssqError as e:
        if flag == "-m":
            raise
        raise type(e)(f"{flag}: {e}") from None
    if span is not None and span[1] > config.max_position_embeddings:
        flags, tokens = span
        raise InvalidArgument(
            flags.split()[0],
            f"{flags} ({tokens} tokens) exceeds the context of {name}: {config.max_position_embeddings} tokens "
            "(its max_position_embeddings)",
        )


def _check_output(flag: str, path: Path | None) -> None:
    """An output file that can be written once the work is done: not a directory, its folder creatable."""
    if path is None:
        return
    path = path.expanduser()
    if path.is_dir():
        raise _usage(flag, f"{path} is a directory; name the file to write")
    anchor = path.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise _usage(flag, f"{path}: {anchor} is a file, not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise _usage(flag, f"{path}: not writable")


def _check_outputs(args: argparse.Namespace) -> None:
    outputs = {"--json": args.json_path, "--markdown": args.markdown_path, "--plot": args.plot_path}
    for flag, path in outputs.items():
        _check_output(flag, path)
    given = [(f, p.expanduser().resolve()) for f, p in outputs.items() if p is not None]
    for i, (flag, path) in enumerate(given):
        for other, same in given[:i]:
            if path == same:
                raise _usage(flag, f"and {other} name the same file {path}")
    if args.plot_path is not None:
        from ossq.report import PLOT_SUFFIXES, pyplot

        if args.plot_path.suffix.lower() not in PLOT_SUFFIXES:
            raise _usage("--plot", f"{args.plot_path}: name a {', '.join(PLOT_SUFFIXES[:3])} (or other image) file")
        pyplot()  # fail now, not after the measurements, when matplotlib is missing


def _generation_span(args: argparse.Namespace) -> tuple[str, int] | None:
    """--max-tokens must fit the context, unless --max-kv-size makes the cache rotate."""
    return None if args.max_kv_size else ("--max-tokens", args.max_tokens)


def _check_generate(args: argparse.Namespace) -> None:
    _check_model("-m", args.model, span=_generation_span(args))
    if args.prompts_file is not None:
        _check_prompts_file(args)
    elif args.out is not None:
        raise _usage("--out", "applies only with --prompts-file (a -p answer is printed)")
    elif args.prompt == "-":
        args.prompt = sys.stdin.read()
        if not args.prompt.strip():
            raise _usage("--prompt", "- read nothing from standard input; pipe the message in, or pass it")
    elif not args.prompt.strip():
        raise _usage("--prompt", "is empty; give the user message (or - to read it from standard input)")


def _check_prompts_file(args: argparse.Namespace) -> None:
    path = args.prompts_file.expanduser()
    if args.raw:
        raise _usage("--raw", 'applies only with -p (a prompts file line is raw when it has a "prompt")')
    if args.out is None:
        raise _usage("--prompts-file", "needs --out, the file to write the completions to")
    if not path.is_file():
        raise _usage("--prompts-file", f"{path}: no such file")
    _check_output("--out", args.out)
    if not args.out.expanduser().parent.is_dir():
        raise _usage("--out", f"{args.out}: directory {args.out.expanduser().parent} does not exist")
    if args.out.expanduser().resolve() == path.resolve():
        raise _usage("--out", f"{args.out} is the prompts file itself; name another file")


def _check_convert(args: argparse.Namespace) -> None:
    from ossq.quant.affine import BITS, GROUP_SIZES

    if args.q_mode == "mxfp4":
        for flag, value, only in (("--q-bits", args.q_bits, 4), ("--q-group-size", args.q_group_size, 32)):
            if value not in (None, only):
                raise _usage(flag, f"must be {only} with --q-mode mxfp4 (its only value), got {value}")
    if args.q_bits is not None and args.q_bits not in BITS:
        raise _usage("--q-bits", f"must be one of {', '.join(map(str, BITS))}, got {args.q_bits}")
    if args.q_group_size is not None and args.q_group_size not in GROUP_SIZES:
        raise _usage("--q-group-size", f"must be one of {', '.join(map(str, GROUP_SIZES))}, got {args.q_group_size}")


def _check_bench(args: argparse.Namespace) -> None:
    args.context = [n for group in args.context for n in group] if args.context else None
    for m in args.models:
        _check_model("-m", m, span=("--prompt-tokens + --gen-tokens", args.prompt_tokens + args.gen_tokens))
    _check_outputs(args)


def _check_ppl(args: argparse.Namespace) -> None:
    if args.stride is not None and args.stride > args.window:
        raise _usage("--stride", f"must be at most --window ({args.window}), got {args.stride}")
    if args.doc_separator is not None:
        _check_separator(args.doc_separator)
    if args.reference is not None and args.reference not in args.models:
        raise _usage("--reference", f"{args.reference!r} is not one of the -m models (repeat it exactly)")
    for flag, m in [*(("-m", m) for m in args.models), ("--kl-reference", args.kl_reference)]:
        if m is not None:
            _check_model(flag, m, span=("--window", args.window))
    if args.data is not None:
        _check_data(args.data)
    _check_outputs(args)


def _check_separator(pattern: str) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise _usage("--doc-separator", f"'{pattern}' is not a regular expression ({e})") from None
    if compiled.fullmatch(""):
        raise _usage("--doc-separator", f"'{pattern}' matches the empty string, so it would split every character")


def _check_data(data: str) -> None:
    """A local --data file or directory exists and holds text; a dataset name is left to the command."""
    path = Path(data).expanduser()
    if path.is_dir():
        if not any(p.is_file() and p.suffix in (".txt", ".jsonl") for p in path.rglob("*")):
            raise _usage("--data", f"{path}: no .txt or .jsonl files in this directory")
    elif path.is_file():
        if path.stat().st_size == 0:
            raise _usage("--data", f"{path} is empty")
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as e:
            raise _usage("--data", f"{path}: cannot read it ({e.strerror})") from None
    elif (
        data.startswith((".", "/", "~"))
        or path.suffix in (".txt", ".jsonl", ".json")
        or ("/" in data and Path(data.split("/")[0]).is_dir())
    ):
        raise _usage("--data", f"{data}: no such file or directory")


def _check_draft(args: argparse.Namespace) -> None:
    """A --draft-model checkpoint must be readable and share the vocabulary of every -m model whose config
    is at hand (a hub id is checked once it is downloaded, before the draft's weights load)."""
    from ossq.engine.speculative import NGRAM, check_draft_config
    from ossq.formats.hf import local_checkpoint, read_model_config

    if getattr(args, "tp", 1) > 1 and args.command == "serve":
        raise _usage("--draft-model", "with serve --tp above 1 is not supported yet")
    if args.draft_model == NGRAM:
        return
    _check_model("--draft-model", args.draft_model)
    draft = local_checkpoint(args.draft_model)
    targets = [local_checkpoint(m) for m in (args.models if args.command == "bench" else [args.model])]
    for root in targets:
        if draft is not None and root is not None:
            check_draft_config(read_model_config(root)[1], read_model_config(draft)[1])


def _check_quickstart(args: argparse.Namespace) -> None:
    cache = args.cache_dir.expanduser() if args.cache_dir is not None else None
    if cache is not None and cache.exists() and not cache.is_dir():
        raise _usage("--cache-dir", f"{args.cache_dir} is a file; name a directory")


CHECKS: dict[str, Callable[[argparse.Namespace], None]] = {
    "generate": _check_generate,
    "chat": lambda args: _check_model("-m", args.model, span=_generation_span(args)),
    "convert": _check_convert,
    "bench": _check_bench,
    "ppl": _check_ppl,
    "quickstart": _check_quickstart,
}


def validate(args: argparse.Namespace) -> None:
    """Everything about the flags that can be known before the work starts (module docstring)."""
    _check_device(args)
    check = CHECKS.get(args.command)
    if check is not None:
        check(args)
    if getattr(args, "draft_model", None) is not None:
        _check_draft(args)


# ---- running: errors, interruptions, signals ------------------------------------------------------------
class Stopped(BaseException):
    """SIGTERM or SIGHUP (or SIGINT while writing) as an exception: cleanup (`finally`, the staging
    directory's removal) runs on the way out. Not an Exception, so no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


OSSQ_DIR = str(Path(__file__).resolve().parent)


class _StopSignals:
    """While active, the named signals raise `Stopped` — once; a repeat during cleanup is ignored.

    A signal interrupts whatever bytecode is running, and third-party code may swallow an exception raised
    there (a `__del__`) or turn it into another (numpy's and torch's protocol probes catch anything and
    raise a ValueError). So `Stopped` is raised only in ossq's own code: when the signal lands elsewhere,
    a trace function raises it at the next line ossq runs. `signum` records the signal either way."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names, self.signum, self.previous = names, None, {}
        self._tracing: tuple[object, list] | None = None  # (the trace function we replaced, frames we trace)

    def __enter__(self) -> _StopSignals:
        for name in self.names:
            signum = getattr(signal, name, None)
            if signum is not None:
                with contextlib.suppress(ValueError):  # not the main thread: leave the signals alone
                    self.previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        self._stop_tracing()
        for signum, old in self.previous.items():
            signal.signal(signum, old)

    def _handler(self, signum: int, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if frame is None or frame.f_code.co_filename.startswith(OSSQ_DIR):
            raise Stopped(signum)
        self._raise_in_ossq(frame)

    def _raise_in_ossq(self, frame) -> None:
        def local(_f, event: str, _arg):
            if event in ("line", "return"):
                self._stop_tracing()
                raise Stopped(self.signum)
            return local

        def new_frame(f, _event: str, _arg):
            return local if f.f_code.co_filename.startswith(OSSQ_DIR) else None

        traced = []
        while frame is not None:
            if frame.f_code.co_filename.startswith(OSSQ_DIR):
                frame.f_trace = local
                traced.append(frame)
            frame = frame.f_back
        self._tracing = (sys.gettrace(), traced)
        sys.settrace(new_frame)

    def _stop_tracing(self) -> None:
        if self._tracing is not None:
            prior, traced = self._tracing
            self._tracing = None
            for f in traced:
                f.f_trace = None
            sys.settrace(prior)


def _flag_message(e: InvalidArgument) -> str:
    """An InvalidArgument's message with its Python parameter replaced by the flag the user typed."""
    flag = e.name if e.name.startswith("-") else PARAM_FLAGS.get(e.name, "--" + e.name.replace("_", "-"))
    text = str(e)
    if text.startswith(flag):
        return text
    rest = re.sub(rf"^(?:\w+\.)?{re.escape(e.name)}\b(?:=\S+)?:?\s*", "", text)
    return f"{flag} {rest}"


def _output_dir(args: argparse.Namespace) -> Path | None:
    if args.command == "convert" and not args.dry_run:
        return args.mlx_path.expanduser()
    return args.out.expanduser() if args.command == "synth" else None


def _identity(path: Path | None) -> tuple[int, int] | None:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_dev, st.st_ino)


def _interrupted(args: argparse.Namespace, before: tuple[int, int] | None) -> str:
    out = _output_dir(args)
    if args.command not in WRITERS:
        return "interrupted"
    if out is not None and _identity(out) not in (None, before):
        return f"interrupted after {out} was written"
    return "interrupted, nothing written"


def _fresh_line() -> str:
    """A newline after the terminal's "^C", none in a log."""
    return "\n" if sys.stderr.isatty() else ""


def _os_error(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return e.strerror or str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a flag error (2), --help or --version (0): a status to return, not to raise
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    prog = f"ossq {args.command}"
    before = _identity(_output_dir(args))
    stops = _StopSignals(("SIGINT", "SIGTERM", "SIGHUP") if args.command in WRITERS else ("SIGTERM", "SIGHUP"))
    try:
        with stops:
            validate(args)
            status = COMMANDS[args.command](args) or 0
    except BaseException as e:
        if stops.signum is not None and not isinstance(e, (KeyboardInterrupt, Stopped)):
            e = Stopped(stops.signum)  # library code turned the signal's exception into another one
        return _failure(prog, args, before, e)
    if stops.signum is not None:  # the signal came too late to stop the work
        return _failure(prog, args, before, Stopped(stops.signum))
    return status


def _failure(prog: str, args: argparse.Namespace, before: tuple[int, int] | None, e: BaseException) -> int:
    """Print the one line for what stopped the command and return the exit status; re-raise a bug."""
    if isinstance(e, (KeyboardInterrupt, Stopped)):
        print(f"{_fresh_line()}{prog}: {_interrupted(args, before)}", file=sys.stderr)
        return 128 + e.signum if isinstance(e, Stopped) else 130
    if isinstance(e, InvalidArgument):
        message = _flag_message(e)
    elif isinstance(e, (OssqError, ValueError)):
        message = str(e)
    elif isinstance(e, OSError):
        message = _os_error(e)
    else:
        raise e
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


# ---- the commands ---------------------------------------------------------------------------------------
def _sampling(args: argparse.Namespace):
    from ossq.engine.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _chat(args: argparse.Namespace):
    from ossq.harmony import Chat

    return Chat(system=args.system, developer=args.developer, reasoning_effort=args.reasoning_effort)


def cmd_generate(args: argparse.Namespace) -> int:
    from ossq.engine.launch import launch
    from ossq.engine.parallel import check_checkpoint

    ranks = _ranks(args)
    # a model that cannot be split fails before any rank starts
    check_checkpoint(args.model, ranks, args.ops, expert_only=args.ep > 1)
    args.placement = _placement(args, [args.model])
    return launch(_generate, args, tp=ranks, device=args.device)


def _placement(args: argparse.Namespace, models: list[str]) -> tuple[tuple[int, ...], ...] | None:
    """--ep-placement read and checked against every model, before any rank starts."""
    if args.ep_placement is None:
        return None
    if args.ep < 2:
        raise InvalidArgument("ep_placement", "--ep-placement places the experts of --ep N; pass --ep too")
    from ossq.engine.parallel import read_placement
    from ossq.formats.hf import Checkpoint

    placements = set()
    for model in models:
        ckpt = Checkpoint(model)
        try:
            placements.add(read_placement(args.ep_placement, ckpt.config, args.ep))
        finally:
            ckpt.close()
    if len(placements) > 1:
        raise InvalidArgument("ep_placement", "--ep-placement gives one placement; bench these models apart")
    return placements.pop()


def _ranks(args: argparse.Namespace) -> int:
    """The ranks --tp or --ep asks for."""
    if args.ep > 1 and args.tp > 1:
        raise InvalidArgument("ep", "--tp and --ep together are not supported; choose one")
    return max(args.tp, args.ep)


def _load(args: argparse.Namespace, parallel):
    """The model of -m, or under --tp this rank's shard of it (engine/parallel.py)."""
    from ossq.chat import load_for_chat
    from ossq.engine.generate import load

    if not parallel.active:
        return load_for_chat(args.model, device=args.device, ops=args.ops)
    return load(args.model, device=parallel.device, ops=args.ops, parallel=parallel)


def _engine(args: argparse.Namespace, model, config):
    """The command's engine, speculative with --draft-model (ossq/chat.py `engine_for_chat`)."""
    from ossq.chat import engine_for_chat

    return engine_for_chat(
        model, config, draft_model=args.draft_model, num_draft_tokens=args.num_draft_tokens, ops=args.ops
    )


def _generate(parallel, args: argparse.Namespace) -> int:
    """`ossq generate` on one rank: every rank runs the same requests; only rank 0's output is shown."""
    from ossq.chat import answer
    from ossq.engine.generate import generate

    if args.ep > 1:
        parallel = dataclasses.replace(parallel, expert_only=True, placement=args.placement)
    sampling, chat, config = parallel.sampling(_sampling(args)), _chat(args), _engine_config(args)
    model, tokenizer = _load(args, parallel)
    engine = _engine(args, model, parallel.engine_config(config, model))
    if parallel.expert_only and parallel.rank and args.prompts_file is None:
        engine.wait_for_peers()  # one prompt: rank 0 runs it, the others lend it their experts
        return 0
    common = dict(sampling=sampling, max_tokens=args.max_tokens, engine=engine)
    if args.prompts_file is not None:
        from ossq.batch import run_prompts_file

        result = run_prompts_file(
            model,
            tokenizer,
            args.prompts_file,
            args.out,
            max_tokens=args.max_tokens,
            sampling=sampling,
            reasoning_effort=args.reasoning_effort,
            engine=engine,
            parallel=parallel,
        )
        print(f"wrote {len(result.texts)} completions to {args.out}")
    elif args.raw:
        generate(model, tokenizer, args.prompt, verbose=True, **common)
    else:
        chat.add_user(args.prompt)
        answer(model, tokenizer, chat, show_reasoning=not args.hide_reasoning, catch_interrupt=False, **common)
    engine.wait_for_peers()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ossq.chat import interactive, load_for_chat

    sampling, chat, config = _sampling(args), _chat(args), _engine_config(args)
    model, tokenizer = load_for_chat(args.model, device=args.device, ops=args.ops)
    interactive(
        model,
        tokenizer,
        chat,
        sampling=sampling,
        max_tokens=args.max_tokens,
        engine=_engine(args, model, config),  # one engine for the whole chat: each turn reuses the last's cache
        show_reasoning=not args.hide_reasoning,
    )
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ossq.synth import synthesize

    out = synthesize(args.out, config=args.preset, seed=args.seed, device=args.device or "cpu", overwrite=args.force)
    print(f"wrote a random gpt-oss ({args.preset}) checkpoint to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ossq.convert import convert

    convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        q_mode=args.q_mode,
        quant_predicate=args.quant_predicate,
        dtype=args.dtype,
        dequantize=args.dequantize,
        experts=args.experts,
        force=args.force,
        dry_run=args.dry_run,
        device=args.device,
        calibrate=args.calibrate,
        calib_data=args.calib_data,
        calib_tokens=args.calib_tokens,
        target_bpw=args.target_bpw,
        max_bits=args.max_bits,
        distill=args.distill,
        distill_lr=args.distill_lr,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ossq.engine.launch import launch
    from ossq.engine.parallel import check_checkpoint

    ranks = _ranks(args)
    for model in args.models:
        check_checkpoint(model, ranks, args.ops, expert_only=args.ep > 1)
    args.placement = _placement(args, args.models)
    return launch(_bench, args, tp=ranks, device=args.device)


def _bench(parallel, args: argparse.Namespace) -> int:
    """`ossq bench` on one rank (rank 0 reports; engine/parallel.py)."""
    from ossq.bench import bench

    if args.ep > 1:
        parallel = dataclasses.replace(parallel, expert_only=True, placement=args.placement)
    result = bench(
        args.models,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        context=args.context,
        batch=args.batch,
        sweep_context=args.sweep_context,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        seed=args.seed,
        kv_cache_tokens=args.kv_cache_tokens,
        ops=args.ops,
        cuda_graphs=args.cuda_graphs,
        overlap=args.overlap,
        json_path=args.json_path,
        markdown_path=args.markdown_path,
        plot_path=args.plot_path,
        parallel=parallel,
        draft_model=args.draft_model,
        num_draft_tokens=args.num_draft_tokens,
    )
    return 1 if any(m.error for m in result.models) else 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from ossq.perplexity import DEFAULT_DATASET, perplexity
    from ossq.report import print_report

    result = perplexity(
        args.models,
        data=args.data or DEFAULT_DATASET,
        window=args.window,
        stride=args.stride,
        max_tokens=args.max_tokens,
        eos_between_docs=args.eos_between_docs,
        doc_separator=args.doc_separator,
        reference=args.reference,
        kl_reference=args.kl_reference,
        device=args.device,
        ops=args.ops,
        json_path=args.json_path,
        markdown_path=args.markdown_path,
        plot_path=args.plot_path,
    )
    print_report(result.report)
    return 1 if any(r.error for r in result.results) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import ossq.serve.app  # noqa: F401 (a missing extra fails here, before any rank starts)
    except ImportError as e:
        raise OssqError(
            f"ossq serve needs FastAPI and uvicorn ({e.name or e} is not installed): pip install 'ossq[serve]'"
        ) from None
    from ossq.engine.launch import launch
    from ossq.engine.parallel import check_checkpoint

    _check_model("-m", args.model)
    if args.dp > 1 and args.tp > 1:
        raise InvalidArgument("dp", "--dp with --tp is not supported yet; choose one")
    _replica_devices(args.device, args.dp)  # too few GPUs fails before the model loads
    check_checkpoint(args.model, args.tp, args.ops)  # a model that cannot be split fails before any rank starts
    return launch(_serve, args, tp=args.tp, device=args.device, graceful=True)


def _replica_devices(device: str | None, n: int) -> list[str | None]:
    """The device of each --dp replica: cuda:0 … cuda:n−1 on CUDA, all on the CPU otherwise."""
    if n == 1:
        return [device]
    from ossq.device import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return [device] * n
    if dev.index is not None:
        raise DeviceError(f"--dp {n} places replica i on cuda:i; pass --device cuda, not {device}")
    import torch

    if torch.cuda.device_count() < n:
        count = torch.cuda.device_count()
        raise DeviceError(f"--dp {n} needs {n} GPUs, one per replica, but this machine has {count}")
    return [f"cuda:{i}" for i in range(n)]


def _serve(parallel, args: argparse.Namespace) -> int:
    """`ossq serve` on one rank: rank 0 listens and serves; under --tp the others replay its engine's
    calls (serve/mirror.py) until it stops them. A signal reaches rank 0 only (launch's `graceful`)."""
    from ossq.serve.app import ServeConfig, listen, serve
    from ossq.serve.mirror import follow

    engine_config = _engine_config(args)
    if parallel.rank == 0:
        if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"ossq serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
        sock = listen(args.host, args.port)  # a busy port fails now, not after the load
    engines = []
    for device in _replica_devices(args.device, args.dp):  # --dp: one engine per replica
        model, tokenizer = _load(argparse.Namespace(**{**vars(args), "device": device}), parallel)
        engines.append(_engine(args, model, parallel.engine_config(engine_config, model)))
    if parallel.rank:
        follow(engines[0], tokenizer, parallel)
        return 0
    name = args.served_model_name or (Path(args.model).name if Path(args.model).expanduser().is_dir() else args.model)
    config = ServeConfig(name, api_key=args.api_key, max_queue=args.max_queue)
    serve(engines, tokenizer, config, sock, log_level=args.log_level, parallel=parallel)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from ossq.quickstart import quickstart

    quickstart(cache_dir=args.cache_dir, interactive_chat=sys.stdin.isatty() and not os.environ.get("CI"))
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "synth": cmd_synth,
    "convert": cmd_convert,
    "bench": cmd_bench,
    "ppl": cmd_ppl,
    "serve": cmd_serve,
    "quickstart": cmd_quickstart,
}

if __name__ == "__main__":
    sys.exit(main())
