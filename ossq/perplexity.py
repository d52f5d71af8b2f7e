"""`ossq ppl`: perplexity and KL divergence of checkpoints over one token stream, windowed and streamed.

Conventions (the model cards' method: window = stride = 4096 over ~100k tokens, EOS between documents):

- Data. A `.jsonl` file is one document per line (its `text` field); any other file is one document, or
  several when `doc_separator` (a regular expression, e.g. `\\n\\s*\\n` for blank lines) splits it; a
  directory is every `.txt`/`.jsonl` file under it, in sorted order. Anything else is a Hugging Face
  dataset `name[:config[:split]]` (default `wikitext:wikitext-2-raw-v1:test`) read through `datasets`;
  WikiText's rows are lines, so its documents are the articles (a ` = Title = ` row starts one).
  Documents are stripped of surrounding whitespace; empty ones are dropped.
- Stream. Documents are encoded one at a time with o200k_harmony (special-token text stays text) and
  joined as A + [EOS] + B + [EOS] + C, `<|endoftext|>` (199999) between documents, none after the last:
  EOS separates, so the stream does not end by predicting one. Encoding stops at `max_tokens`.
- Windows. A window is `window` input tokens run from position 0 as a request of its own; its targets are
  the next tokens. Window k starts at token k·stride; the first window scores all its targets, later ones
  only the targets past the previous window's last (its last `stride`). So every token but the stream's
  first is scored exactly once, and a window's first token is never a target of that window (it has no
  context) — with stride = window it is the previous window's last target.
- Scores, per scored token, in float32 from full log-softmax distributions: NLL = −log p(target);
  with a reference model, KL(P_ref ‖ P_model) and whether both argmaxes agree.

Memory: one window's KV cache per model and one chunk's logits (chunk × V float32, 412 MB at 512 × 201,088)
plus the log-softmaxes of `SCORE_ROWS` rows at a time; per-token scores are kept (12 bytes a token).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ossq.device import resolve_device
from ossq.engine.engine import PREFILL_CHUNK_TOKENS, Engine, EngineConfig
from ossq.engine.kv import BLOCK_TOKENS, blocks_for
from ossq.engine.load import load_model
from ossq.engine.model import GptOss
from ossq.errors import OssqError, PromptTooLong
from ossq.harmony import ENDOFTEXT
from ossq.report import Metric, Report, model_names, system_info, write_files
from ossq.tokenizer import Tokenizer

DEFAULT_DATASET = "wikitext:wikitext-2-raw-v1:test"
LOCAL_SUFFIXES = (".txt", ".jsonl")
SCORE_ROWS = 128  # rows of a chunk's logits turned into log-probabilities at once (bounds the extra memory)
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \s*$")


# ---- documents ------------------------------------------------------------------------------------------
def documents(data: str | Path, *, doc_separator: str | None = None) -> Iterator[str]:
    """The non-empty, whitespace-stripped documents of `data` (a file, a directory or a dataset name; see
    the module docstring), lazily. Raises OssqError for a missing path or an unreadable dataset."""
    path = Path(data).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise OssqError(f"{path}: no .txt or .jsonl files in this directory")
        raw: Iterable[str] = (d for f in files for d in _file_documents(f, doc_separator))
    elif path.is_file():
        raw = _file_documents(path, doc_separator)
    elif _looks_like_path(str(data)):
        raise OssqError(f"{data}: no such file or directory")
    else:
        raw = _dataset_documents(str(data))
    return (d.strip() for d in raw if d.strip())


def _looks_like_path(data: str) -> bool:
    return data.startswith((".", "/", "~")) or data.endswith((*LOCAL_SUFFIXES, ".json"))


def _file_documents(path: Path, doc_separator: str | None) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
        return
    text = _read_text(path)
    yield from (re.split(doc_separator, text) if doc_separator else [text])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OssqError(f"{path}: cannot read as UTF-8 text ({e})") from None


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                text = None
            if not isinstance(text, str):
                raise OssqError(f"{path}:{number}: expected a JSON object with a string 'text' field")
            yield text


def _dataset_documents(spec: str) -> Iterator[str]:
    """Rows of a Hugging Face dataset `name[:config[:split]]`; `datasets` is imported only here."""
    name, config, split = (spec.split(":") + [None, None])[:3]
    if name == "wikitext" and config is None:
        config = "wikitext-2-raw-v1"
    remedy = "pass a local .txt/.jsonl file or a directory of them with --data"
    try:
        import datasets
    except ImportError:
        raise OssqError(
            f"reading the dataset {spec!r} needs the `datasets` package (not installed); {remedy}"
        ) from None
    try:
        rows = datasets.load_dataset(name, config, split=split or "test")
    except Exception as e:  # the hub client raises many types (offline, missing, gated); all mean "not here"
        raise OssqError(f"cannot load the dataset {spec!r} ({type(e).__name__}: {e}); {remedy}") from None
    texts = (row["text"] for row in rows)
    return _wikitext_articles(texts) if "wikitext" in name.lower() else texts


def _wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """WikiText rows are lines; a top-level heading row (` = Title = `) starts the next article."""
    article: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line) and article:
            yield "".join(article)
            article = []
        article.append(line)
    if article:
        yield "".join(article)


def token_stream(
    docs: Iterable[str],
    encode: Callable[[str], list[int]],
    *,
    max_tokens: int,
    eos_between_docs: bool = True,
) -> list[int]:
    """A + [EOS] + B + [EOS] + C (no EOS after the last document), cut at `max_tokens`; documents are
    encoded one at a time and reading stops once the stream is full. Without `eos_between_docs` the
    documents' ids are simply concatenated."""
    ids: list[int] = []
    for doc in docs:
        if ids and eos_between_docs:
            ids.append(ENDOFTEXT)
        ids.extend(encode(doc))
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


# ---- windows --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """Input tokens [start, stop) of one forward; targets start+1 … stop; those ≥ `first_scored` count."""

    start: int
    stop: int
    first_scored: int


def windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows covering a stream of `n_tokens`: targets 1 … n_tokens−1 each scored exactly once."""
    if window < 1 or not 1 <= stride <= window:
        raise OssqError(f"need window ≥ 1 and 1 ≤ stride ≤ window, got window {window}, stride {stride}")
    out: list[Window] = []
    scored_to = 0  # last target position scored so far
    for start in range(0, max(n_tokens - 1, 0), stride):
        stop = min(start + window, n_tokens - 1)
        out.append(Window(start, stop, scored_to + 1))
        scored_to = stop
        if stop == n_tokens - 1:
            break
    return out


# ---- scoring --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenScores:
    """Per scored token, in stream order (targets 1 … n−1): `nll` (N,) float32 nats; with a reference
    `kl` (N,) float32 nats of KL(P_ref ‖ P_model) and `agree` (N,) bool, top-1 equal. `seconds` = wall
    time of the evaluation (both models' forwards when there is a reference)."""

    nll: torch.Tensor
    kl: torch.Tensor | None
    agree: torch.Tensor | None
    windows: int
    seconds: float


def check_window(model: GptOss, window: int, name: str = "the model") -> None:
    limit = model.config.max_position_embeddings
    if window > limit:
        raise PromptTooLong(
            f"a window of {window} tokens exceeds {name}'s context of {limit} (max_position_embeddings); "
            "pass a smaller --window"
        )


def _check_vocab(model: GptOss, ids: torch.Tensor) -> None:
    top = int(ids.max())
    if top >= model.config.vocab_size:
        raise OssqError(
            f"token id {top} is outside the model's vocabulary of {model.config.vocab_size}; "
            "perplexity text needs a checkpoint with the o200k_harmony vocabulary"
        )


@torch.inference_mode()
def evaluate(
    model: GptOss,
    tokens: Sequence[int] | torch.Tensor,
    *,
    window: int,
    stride: int | None = None,
    reference: GptOss | None = None,
    chunk: int = PREFILL_CHUNK_TOKENS,
    on_scored: Callable[[int], None] | None = None,
) -> TokenScores:
    """Score `tokens` (at least 2 ids) with `model`, and against `reference` when given (run on the same
    windows, in steps of the same `chunk`, each on an engine of its own). `on_scored(n)` is called after
    each window with the number of tokens it scored."""
    if len(tokens) < 2:
        raise OssqError(f"need at least 2 tokens to score one, got {len(tokens)}")
    ids = torch.as_tensor(tokens, dtype=torch.long).view(-1)
    pair = [m for m in (model, reference) if m is not None]
    for m, name in zip(pair, ("the model", "the reference"), strict=False):
        check_window(m, window, name)
        _check_vocab(m, ids)
    config = EngineConfig(
        kv_cache_tokens=blocks_for(window) * BLOCK_TOKENS, max_num_seqs=1, max_batch_tokens=chunk, prefix_cache=False
    )
    engines = [Engine(m, config) for m in pair]
    spans = windows(ids.numel(), window, stride or window)
    begin = time.perf_counter()
    parts: list[tuple[torch.Tensor, ...]] = []
    for w in spans:
        parts.extend(_score_window(engines, ids, w))
        if on_scored is not None:
            on_scored(w.stop - w.first_scored + 1)
    nll, kl, agree = (torch.cat(p).cpu() if p[0] is not None else None for p in zip(*parts, strict=True))
    return TokenScores(nll, kl, agree, len(spans), time.perf_counter() - begin)


def _score_window(engines: list[Engine], ids: torch.Tensor, w: Window) -> list[tuple[torch.Tensor, ...]]:
    """Run one window (inputs w.start … w.stop − 1) as a request on each engine; score the chunks of
    logits from the first input whose target is scored. Input i predicts target i + 1."""
    inputs = ids[w.start : w.stop].tolist()
    first = w.first_scored - 1 - w.start
    streams = [e.stream(e.add_request(inputs, max_tokens=1, logits_from=first)) for e in engines]
    out = []
    for outs in zip(*streams, strict=True):
        if outs[0].logits is None:
            continue
        assert len({o.logits_start for o in outs}) == 1, "the engines stepped the window differently"
        a = w.start + outs[0].logits_start  # absolute position of the first input with logits
        targets = ids[a + 1 : a + 1 + outs[0].logits.shape[0]].to(outs[0].logits.device)
        ref = outs[-1].logits if len(outs) > 1 else None
        out.append(score_logits(outs[0].logits, targets, ref))
    for e in engines:
        for rid in list(e.requests):
            e.release(rid)
    return out


def score_logits(
    logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """logits (T, V), targets (T,) → NLL (T,), and with ref_logits (T, V): KL(P_ref ‖ P) (T,) and top-1
    agreement (T,) bool. Float32, `SCORE_ROWS` rows at a time."""
    nll, kl, agree = [], [], []
    for r in range(0, logits.shape[0], SCORE_ROWS):
        lp = torch.log_softmax(logits[r : r + SCORE_ROWS].float(), dim=-1)  # (rows, V)
        nll.append(-lp.gather(-1, targets[r : r + SCORE_ROWS, None])[:, 0])
        if ref_logits is logits:  # the reference against itself: exactly 0 and 1, no second pass
            kl.append(torch.zeros_like(nll[-1]))
            agree.append(torch.ones_like(nll[-1], dtype=torch.bool))
        elif ref_logits is not None:
            lq = torch.log_softmax(ref_logits[r : r + SCORE_ROWS].float(), dim=-1)
            agree.append(lq.argmax(-1) == lp.argmax(-1))
            kl.append(lp.neg_().add_(lq).mul_(lq.exp()).sum(-1))  # Σ p_ref (ln p_ref − ln p), lp reused
    if ref_logits is None:
        return torch.cat(nll), None, None
    return torch.cat(nll), torch.cat(kl), torch.cat(agree)


# ---- results --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PplResult:
    """One model's figures (None where not measured), or the `error` that stopped it."""

    model: str
    perplexity: float | None = None
    std_error: float | None = None  # delta method: perplexity · std(NLL) / √n
    tokens: int = 0  # scored
    windows: int = 0
    seconds: float = 0.0
    tokens_per_s: float | None = None
    kl_mean: float | None = None  # nats
    kl_p99: float | None = None
    top1_agreement: float | None = None  # fraction in [0, 1]
    error: str | None = None

    @classmethod
    def from_scores(cls, model: str, s: TokenScores) -> PplResult:
        nll = s.nll.double()
        n = nll.numel()
        ppl = math.exp(float(nll.mean()))
        std = float(nll.std()) if n > 1 else 0.0
        kl = None if s.kl is None else s.kl.double().numpy()
        return cls(
            model=model,
            perplexity=ppl,
            std_error=ppl * std / math.sqrt(n),
            tokens=n,
            windows=s.windows,
            seconds=s.seconds,
            tokens_per_s=n / s.seconds if s.seconds > 0 else None,
            kl_mean=None if kl is None else float(kl.mean()),
            kl_p99=None if kl is None else float(np.percentile(kl, 99)),
            top1_agreement=None if s.agree is None else float(s.agree.double().mean()),
        )

    def row(self) -> dict[str, Any]:
        """The report.py row: every figure, or only `model` and `error` for a model that failed."""
        if self.error:
            return {"model": self.model, "error": self.error}
        return {k: v for k, v in self.__dict__.items() if k != "error"}


PPL = Metric("perplexity", "perplexity", higher_is_better=False, format="{:.3f}")
STD_ERROR = Metric("std_error", "± std error", higher_is_better=False, format="{:.3f}", error_of="perplexity")
KL_MEAN = Metric("kl_mean", "mean KL", "nats", higher_is_better=False, format="{:.5f}")
KL_P99 = Metric("kl_p99", "p99 KL", "nats", higher_is_better=False, format="{:.5f}")
TOP1 = Metric("top1_agreement", "top-1 agreement", higher_is_better=True, format="{:.2%}")
SPEED = Metric("tokens_per_s", "speed", "tok/s", higher_is_better=True, format="{:,.0f}")


@dataclass(frozen=True)
class PplReport:
    """Every model's result over the same token stream, the run's settings, and where it ran."""

    results: tuple[PplResult, ...]
    settings: dict[str, Any]
    reference: str | None = None  # the model changes in % are relative to
    system: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> Report:
        """As a report.py `Report` (print_report / to_json / to_markdown / plot_bars)."""
        kl = self.settings.get("kl_reference") is not None
        metrics = (PPL, STD_ERROR, *((KL_MEAN, KL_P99, TOP1) if kl else ()), SPEED)
        title = f"perplexity on {self.settings['data']}"
        names = dict(zip((r.model for r in self.results), model_names([r.model for r in self.results]), strict=True))
        rows = tuple({**r.row(), "model": names[r.model], "path": r.model} for r in self.results)
        reference = names.get(self.reference, self.reference)
        return Report("ppl", title, self.system, self.settings, metrics, rows, reference)


# ---- the command ----------------------------------------------------------------------------------------
def read_tokens(
    data: str | Path, *, max_tokens: int, eos_between_docs: bool = True, doc_separator: str | None = None
) -> list[int]:
    """The stream the evaluation scores (module docstring), encoded with o200k_harmony; OssqError when
    `data` holds fewer than 2 tokens of text."""
    if max_tokens < 2:
        raise OssqError(f"max_tokens must be at least 2, got {max_tokens}")
    tokenizer = Tokenizer.o200k_harmony()
    docs = documents(data, doc_separator=doc_separator)
    ids = token_stream(
        docs,
        lambda t: tokenizer.encode(t, allow_special=False),
        max_tokens=max_tokens,
        eos_between_docs=eos_between_docs,
    )
    if len(ids) < 2:
        raise OssqError(f"{data}: no text to score ({len(ids)} tokens); pass a file or dataset with text in it")
    return ids


def perplexity(
    models: Sequence[str],
    *,
    data: str = DEFAULT_DATASET,
    window: int = 4096,
    stride: int | None = None,
    max_tokens: int = 100_000,
    eos_between_docs: bool = True,
    doc_separator: str | None = None,
    reference: str | None = None,
    kl_reference: str | None = None,
    device: str | None = None,
    ops: str | None = None,
    progress: bool = True,
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    plot_path: str | Path | None = None,
) -> PplReport:
    """Perplexity of every model (checkpoint directories or hub ids) over one token stream of `data`, with
    KL(P_kl_reference ‖ P_model) and top-1 agreement when `kl_reference` is given (loaded once, beside
    each model in turn). A model that fails to load or run gets a row with its error; OssqError when the
    settings or data are unusable, or when every model failed. `stride` defaults to `window`."""
    if not models:
        raise OssqError("no models to evaluate")
    if reference is not None and reference not in models:
        raise OssqError(f"the reference {reference!r} is not one of the models evaluated")
    stride = stride or window
    windows(2, window, stride)  # validates window and stride before any work
    tokens = read_tokens(data, max_tokens=max_tokens, eos_between_docs=eos_between_docs, doc_separator=doc_separator)
    dev = resolve_device(device)
    ref_model = load_model(kl_reference, device=dev, ops=ops)[0] if kl_reference else None
    with _progress_bar(progress) as bar:
        results = tuple(
            _run_one(name, tokens, kl_reference, ref_model, window=window, stride=stride, device=dev, ops=ops, bar=bar)
            for name in models
        )
    if all(r.error for r in results):
        raise OssqError("every model failed: " + "; ".join(f"{r.model}: {r.error}" for r in results))
    settings = {
        "data": str(data),
        "tokens": len(tokens),
        "window": window,
        "stride": stride,
        "max_tokens": max_tokens,
        "eos_between_docs": eos_between_docs,
        "doc_separator": doc_separator,
        "kl_reference": kl_reference,
        "device": str(dev),
    }
    result = PplReport(results, settings, reference, system_info(str(dev)))
    write_files(
        result.report,
        json_path=json_path,
        markdown_path=markdown_path,
        plot_path=plot_path,
        plot_metrics=[m for m in result.report.metrics if m not in (STD_ERROR, SPEED)],
    )
    return result


def _run_one(
    name: str,
    tokens: list[int],
    ref_name: str | None,
    ref_model: GptOss | None,
    *,
    window: int,
    stride: int,
    device: torch.device,
    ops: str | None,
    bar: Progress,
) -> PplResult:
    """One model's row; a failure to load or run it (including running out of memory) becomes its error."""
    task = bar.add_task(name, total=len(tokens) - 1)
    try:
        model = (
            ref_model if ref_name is not None and _same(name, ref_name) else load_model(name, device=device, ops=ops)[0]
        )
        scores = evaluate(
            model, tokens, window=window, stride=stride, reference=ref_model, on_scored=lambda n: bar.advance(task, n)
        )
    except (OssqError, OSError, torch.OutOfMemoryError) as e:
        return PplResult(name, error=str(e) or type(e).__name__)
    finally:
        model = None  # free the weights before the next model loads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return PplResult.from_scores(name, scores)


def _same(a: str, b: str) -> bool:
    """Two names of one checkpoint: equal strings, or paths to the same directory."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _progress_bar(enabled: bool) -> Progress:
    """Tokens scored per model, on stderr (stdout keeps the tables)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
