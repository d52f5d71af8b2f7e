"""`ossq generate --prompts-file IN --out OUT`: batch inference over a JSONL file of prompts.

Input, one JSON object a line: `prompt` (raw text, sent without the chat format) or `messages` (chat
form: `{"role": "system"|"developer"|"user"|"assistant", "content": "..."}`, rendered in harmony),
and optionally `max_tokens`, `temperature`, `top_p`, `seed`, overriding the command's flags. Every line
is checked before any work starts, so a malformed line 900 does not cost 899 generations.

Output, one line per input line in the same order: `index`, `text` (the whole completion), `analysis`
and `final` (the harmony channels; null for a raw prompt whose completion is not harmony),
`finish_reason`, `prompt_tokens`, `completion_tokens`, `cached_tokens`. All requests run concurrently on
the engine (continuous batching); the output is written atomically once all are done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ossq.engine.engine import Engine
from ossq.engine.generate import BatchResponse, batch_generate
from ossq.engine.model import GptOss
from ossq.engine.parallel import SINGLE, Parallel
from ossq.engine.sampling import SamplingParams
from ossq.errors import InvalidArgument, OssqError
from ossq.harmony import Chat, Reply, parse_reply
from ossq.tokenizer import Tokenizer

OVERRIDES = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "seed": int}
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class PromptLine:
    ids: list[int]
    chat: bool  # rendered from messages: the completion is harmony
    max_tokens: int
    sampling: SamplingParams


def read_prompts(
    path: Path, tokenizer: Tokenizer, *, max_tokens: int, sampling: SamplingParams, reasoning_effort: str
) -> list[PromptLine]:
    """Every line of `path` parsed and checked; errors name the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise OssqError(f"cannot read the prompts file {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(_parse(line, tokenizer, max_tokens, sampling, reasoning_effort))
            except (ValueError, TypeError, KeyError) as e:
                raise OssqError(f"{path}:{n}: {e}") from None
    if not out:
        raise OssqError(f"{path}: no prompts (one JSON object per line)")
    return out


def _parse(line: str, tokenizer: Tokenizer, max_tokens: int, sampling: SamplingParams, effort: str) -> PromptLine:
    d = json.loads(line)
    if not isinstance(d, dict) or ("prompt" in d) == ("messages" in d):
        raise ValueError('each line must be a JSON object with exactly one of "prompt" or "messages"')
    unknown = set(d) - {"prompt", "messages", *OVERRIDES}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    for key, kind in OVERRIDES.items():
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], kind)):
            raise ValueError(f"{key} must be a number, got {d[key]!r}")
    params = dataclasses.replace(sampling, **{k: d[k] for k in ("temperature", "top_p", "seed") if k in d})
    limit = d.get("max_tokens", max_tokens)
    if limit < 1:
        raise InvalidArgument("max_tokens", f"max_tokens must be at least 1, got {limit}")
    if "prompt" in d:
        if not isinstance(d["prompt"], str) or not d["prompt"]:
            raise ValueError('"prompt" must be a non-empty string')
        return PromptLine(tokenizer.encode(d["prompt"]), False, limit, params)
    return PromptLine(_render(d["messages"], effort), True, limit, params)


def _render(messages: Any, effort: str) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    system = developer = None
    chat_turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f'each message needs a "role" in {"/".join(ROLES)} and a string "content", got {m!r}')
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "developer":
            developer = m["content"]
        else:
            chat_turns.append(m)
    chat = Chat(system=system, developer=developer, reasoning_effort=effort)
    for m in chat_turns:
        if m["role"] == "user":
            chat.add_user(m["content"])
        else:
            chat.add_assistant(Reply(analysis="", final=m["content"]))
    return chat.prompt_tokens()


def run_prompts_file(
    model: GptOss,
    tokenizer: Tokenizer,
    prompts_file: Path,
    out: Path,
    *,
    max_tokens: int,
    sampling: SamplingParams,
    reasoning_effort: str = "medium",
    engine: Engine | None = None,
    progress: bool = True,
    parallel: Parallel = SINGLE,
) -> BatchResponse:
    """Every line's completion, written to `out` (by rank 0). Under --ep (`parallel.expert_only`) rank r
    runs lines r, r + N, …, and the ranks' results are gathered in line order."""
    lines = read_prompts(
        prompts_file, tokenizer, max_tokens=max_tokens, sampling=sampling, reasoning_effort=reasoning_effort
    )
    split = parallel.lockstep
    if split and engine is None:
        raise OssqError("under --ep pass the engine of the rank's model (its peers step with it)")
    mine = list(range(parallel.rank, len(lines), parallel.world_size)) if split else list(range(len(lines)))
    with _progress(len(mine), progress) as advance:
        result = batch_generate(
            model,
            tokenizer,
            [lines[i].ids for i in mine],
            max_tokens=[lines[i].max_tokens for i in mine],
            sampling=[lines[i].sampling for i in mine],
            engine=engine,
            on_finish=lambda _i: advance(),
        )
    if split:
        engine.wait_for_peers()
        result = _merge(
            [(list(range(r, len(lines), parallel.world_size)), res) for r, res in enumerate(parallel.gather(result))]
        )
    if parallel.rank == 0:
        _write_atomically(Path(out), [_record(i, p, result) for i, p in enumerate(lines)])
    return result


def _merge(parts: list[tuple[list[int], BatchResponse]]) -> BatchResponse:
    """The ranks' results (each with the line indices it ran) as one, in line order."""
    n = sum(len(idx) for idx, _ in parts)
    fields: dict[str, list] = {f.name: [None] * n for f in dataclasses.fields(BatchResponse)}
    for idx, res in parts:
        for name, values in fields.items():
            for i, value in zip(idx, getattr(res, name), strict=True):
                values[i] = value
    return BatchResponse(**fields)


def _record(i: int, line: PromptLine, result: BatchResponse) -> dict[str, Any]:
    tokens = result.tokens[i]
    reply = parse_reply(tokens) if line.chat else None
    return {
        "index": i,
        "text": result.texts[i],
        "analysis": reply.analysis if reply else None,
        "final": reply.final if reply else None,
        "finish_reason": result.finish_reasons[i],
        "prompt_tokens": result.stats[i].prompt_tokens,
        "completion_tokens": result.stats[i].generation_tokens,
        "cached_tokens": result.stats[i].cached_tokens,
    }


def _write_atomically(path: Path, records: Sequence[dict[str, Any]]) -> None:
    if not path.parent.is_dir():
        raise OssqError(f"cannot write {path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _progress:
    """A rich progress bar over the requests (on stderr), or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.bar.__enter__()
        task = self.bar.add_task("", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
