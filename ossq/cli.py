"""The `ossq` command. Each subcommand parses flags named like the library parameters and calls one
library function; errors the user can fix print one line and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ossq.errors import OssqError

REASONING_EFFORTS = ("low", "medium", "high")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=512, help="tokens to generate at most (default 512)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="cap the keys a full-attention layer keeps (a rotating cache, as mlx-lm's option)",
    )


def _add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--system", default=None, help="model identity line of the system message")
    p.add_argument("--developer", default=None, help="developer instructions")
    p.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default="medium")
    p.add_argument("--hide-reasoning", action="store_true", help="print only the final answer")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _add_sampling(p)


def _add_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_path", type=Path, help="write the report as JSON")
    p.add_argument("--markdown", dest="markdown_path", type=Path, help="write a Markdown report for a model card")
    p.add_argument("--plot", dest="plot_path", type=Path, help="write bar charts (PNG; needs matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ossq", description="gpt-oss: convert, run and measure.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="answer one prompt (harmony chat format)")
    _add_chat(p)
    p.add_argument("-p", "--prompt", required=True, help="the user message ('-' reads standard input)")
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat format")

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    _add_chat(p)

    p = sub.add_parser("synth", help="write a random gpt-oss checkpoint in the published layout")
    p.add_argument("--preset", default="tiny", choices=("tiny", "20b", "120b"))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to draw the random weights (cuda is faster)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")

    p = sub.add_parser("convert", help="quantize a checkpoint into the MLX format (mlx_lm.convert's flags)")
    p.add_argument("--hf-path", required=True, help="source: checkpoint directory or hub id (any layout)")
    p.add_argument("--mlx-path", required=True, type=Path, help="destination directory (must not exist)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (default 4-bit, group 64)")
    p.add_argument("--q-bits", type=int, default=None)
    p.add_argument("--q-group-size", type=int, default=None)
    p.add_argument("--q-mode", default="affine", choices=("affine", "mxfp4"))
    p.add_argument("--quant-predicate", default=None,
                   help="recipe: mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6, tiered, mxfp4-experts, or a file")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
    p.add_argument("-d", "--dequantize", action="store_true", help="write an unquantized (bf16) checkpoint")
    p.add_argument("--experts", default="keep", choices=("keep", "quantize"),
                   help="MXFP4 experts of the source: keep them (mlx-lm's choice) or quantize them too")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--dry-run", action="store_true", help="print the per-tensor plan and size, write nothing")
    p.add_argument("--device", default=None, help="quantize on this device (cuda is faster; same bits)")

    p = sub.add_parser("bench", help="batch-1 speed of one or more checkpoints, side by side")
    p.add_argument("-m", "--model", dest="models", action="append", required=True,
                   help="checkpoint directory or hub id (repeat to compare)")
    p.add_argument("--prompt-tokens", type=int, default=90)
    p.add_argument("--gen-tokens", type=int, default=200)
    p.add_argument("--context", action="append", default=None,
                   help="extra context lengths measured as columns, e.g. 2k or 1k,4k (k = 1024)")
    p.add_argument("--sweep-context", default=None, help="lengths for the tok/s-vs-context plot, e.g. 1k,4k,16k")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    _add_outputs(p)

    p = sub.add_parser("ppl", help="perplexity (and KL vs a reference) of one or more checkpoints")
    p.add_argument("-m", "--model", dest="models", action="append", required=True,
                   help="checkpoint directory or hub id (repeat to compare)")
    p.add_argument("--data", default=None,
                   help="text/JSONL file, directory, or a Hugging Face dataset name[:config[:split]] "
                        "(default: WikiText-2 raw test, needs the network and `datasets`)")
    p.add_argument("--doc-separator", default=None, help="regex splitting a text file into documents")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--stride", type=int, default=None, help="default: the window")
    p.add_argument("--max-tokens", type=int, default=100_000)
    p.add_argument("--eos-between-docs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reference", default=None, help="model the change in percent is relative to")
    p.add_argument("--kl-reference", default=None, help="model whose distribution KL is measured against")
    p.add_argument("--device", default=None)
    _add_outputs(p)

    p = sub.add_parser("quickstart", help="synthesize a tiny model and chat with it: a smoke test of the install")
    p.add_argument("--cache-dir", type=Path, default=None, help="where to keep the tiny model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except (OssqError, ValueError) as e:
        print(f"ossq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


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
    from ossq.chat import answer, load_for_chat
    from ossq.engine.generate import generate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling, chat = _sampling(args), _chat(args)  # validate the flags before the slow load
    model, tokenizer = load_for_chat(args.model, device=args.device)
    common = dict(sampling=sampling, max_tokens=args.max_tokens, max_kv_size=args.max_kv_size)
    if args.raw:
        generate(model, tokenizer, prompt, verbose=True, **common)
    else:
        chat.add_user(prompt)
        answer(model, tokenizer, chat, show_reasoning=not args.hide_reasoning, **common)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ossq.chat import interactive, load_for_chat

    sampling, chat = _sampling(args), _chat(args)
    model, tokenizer = load_for_chat(args.model, device=args.device)
    interactive(model, tokenizer, chat, sampling=sampling, max_tokens=args.max_tokens,
                max_kv_size=args.max_kv_size, show_reasoning=not args.hide_reasoning)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ossq.synth import synthesize

    out = synthesize(args.out, config=args.preset, seed=args.seed, device=args.device, overwrite=args.force)
    print(f"wrote a random gpt-oss ({args.preset}) checkpoint to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ossq.convert import convert

    convert(args.hf_path, args.mlx_path, quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
            q_mode=args.q_mode, quant_predicate=args.quant_predicate, dtype=args.dtype, dequantize=args.dequantize,
            experts=args.experts, force=args.force, dry_run=args.dry_run, device=args.device)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ossq.bench import bench

    bench(args.models, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, context=args.context,
          sweep_context=args.sweep_context, repeats=args.repeats, warmup=args.warmup, device=args.device,
          seed=args.seed, json_path=args.json_path, markdown_path=args.markdown_path, plot_path=args.plot_path)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from ossq.perplexity import DEFAULT_DATASET, perplexity
    from ossq.report import print_report

    result = perplexity(args.models, data=args.data or DEFAULT_DATASET, window=args.window, stride=args.stride,
                        max_tokens=args.max_tokens, eos_between_docs=args.eos_between_docs,
                        doc_separator=args.doc_separator, reference=args.reference,
                        kl_reference=args.kl_reference, device=args.device, json_path=args.json_path,
                        markdown_path=args.markdown_path, plot_path=args.plot_path)
    print_report(result.report)
    return 1 if any(r.error for r in result.results) else 0


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
    "quickstart": cmd_quickstart,
}

if __name__ == "__main__":
    sys.exit(main())
