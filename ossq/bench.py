"""`ossq bench`: batch-1 speed of one or more checkpoints, measured the same way and compared side by side
in the figures model cards report (prompt tok/s, generation tok/s, TTFT, total time, peak memory,
tok/s per GB, size on disk, bits per weight), with optional decode speed at long contexts.

Method (docs/measure.md):
- Prompt: `prompt_tokens` ordinary-token ids (below 199998, the first special id, and below the model's
  vocabulary) drawn from a `seed`ed generator: identical for every model of the same vocabulary. Speed
  does not depend on which ordinary tokens are fed; random ids keep the prompt independent of any
  tokenizer and of the vocabulary size of tiny test models.
- One run: one request on the model's engine (its KV pool allocated before the clock starts, the prefix
  cache off so every run computes its whole prompt): chunked prefill and the first token sampled
  greedily, then exactly `gen_tokens − 1` decode steps, no stop tokens and no detokenizing. Figures per
  run: TTFT (prefill + first sample), decode time; total = TTFT + decode.
- Batch: `batch` sizes N run N requests at once (distinct seeded prompts of `prompt_tokens`, added
  together, continuously batched). Aggregate generation tok/s counts the tokens generated after the last
  request got its first one, over that time; per sequence is the aggregate / N.
- `warmup` runs are discarded; each figure is the median of `repeats` runs, min and max kept.
  prompt tok/s = prompt_tokens / TTFT; generation tok/s = (gen_tokens − 1) / decode time.
- Peak memory: on CUDA `torch.cuda.max_memory_allocated`, reset before the model is loaded (so it
  includes the weights and the KV pool); on CPU the process's peak RSS (reset per model where Linux
  allows it). Unless `kv_cache_tokens` is given, the pool holds just what the largest measurement needs.
- A context length c runs the same measurement with a c-token prompt, so the decode steps attend over a
  c-token cache; `context` lengths become table columns, `sweep_context` lengths a line plot.
- Speculative decoding: with `draft_model` (a checkpoint with the same tokenizer, or "ngram"), the main
  measurement runs again on an engine that drafts up to `num_draft_tokens` a step (engine/speculative.py):
  its generation tok/s, the speed-up over the plain run of the same call, the fraction of draft tokens
  accepted, and the draft tokens accepted and proposed per verification. Greedy decoding makes both runs
  generate the same tokens. The draft is loaded onto the same device after the plain measurements.
- Bandwidth: a batch-1 decode step must read every weight once — except the experts, of which it reads
  top_k of E per layer, and the embedding, of which it reads one row — plus the keys and values each
  layer attends over (the mean context of the run's decode steps). Those bytes, counted from the loaded
  model, times the generation tok/s, over the device's copy bandwidth measured in the same call (a large
  device-to-device copy, read and write counted) is the fraction of the bound the decode reached.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ossq.device import MemoryMeter, resolve_device
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.generate import load
from ossq.engine.kv import BLOCK_TOKENS, blocks_for
from ossq.engine.model import GptOss
from ossq.engine.parallel import SINGLE, Parallel
from ossq.engine.speculative import (
    DEFAULT_NUM_DRAFT_TOKENS,
    NGRAM,
    SpecStats,
    SpeculativeConfig,
    check_draft_config,
    check_num_draft_tokens,
    load_draft,
    speculative_engine,
)
from ossq.errors import InvalidArgument, OssqError
from ossq.formats.hf import Checkpoint, read_model_config, resolve
from ossq.lengths import length_label, parse_lengths
from ossq.quant.recipe import Plan, Recipe
from ossq.quant.spec import QuantSpec
from ossq.report import Metric, Report, Series, model_names, print_report, pyplot, system_info, write_files
from ossq.tokenizer import N_RANKS

# What a failing model raises: our designed errors, missing files, CUDA out-of-memory (a RuntimeError).
MODEL_ERRORS = (OssqError, OSError, RuntimeError, ValueError)


# ---- measured figures ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements, with their min and max."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class Timing:
    """One run, in seconds from adding the request: `ttft` includes sampling the first token;
    `total` = `ttft` + `decode`."""

    ttft: float
    decode: float

    @property
    def total(self) -> float:
        return self.ttft + self.decode


@dataclass(frozen=True)
class RunStats:
    """The timed runs of one (model, prompt length) measurement and the peak memory they reached (GB)."""

    prompt_tokens: int
    gen_tokens: int
    runs: tuple[Timing, ...]
    peak_memory_gb: float

    def spread(self, fn: Callable[[Timing], float]) -> Spread:
        return Spread.of([fn(t) for t in self.runs])

    @property
    def prompt_tps(self) -> Spread:
        return self.spread(lambda t: self.prompt_tokens / t.ttft)

    @property
    def generation_tps(self) -> Spread:
        return self.spread(lambda t: (self.gen_tokens - 1) / t.decode)


@dataclass(frozen=True)
class BatchStats:
    """Timed runs of `size` concurrent requests: aggregate generation tok/s of each run."""

    size: int
    aggregate_tps: tuple[float, ...]

    @property
    def aggregate(self) -> Spread:
        return Spread.of(self.aggregate_tps)

    @property
    def per_sequence(self) -> Spread:
        return Spread.of([r / self.size for r in self.aggregate_tps])


@dataclass(frozen=True)
class SpecBench:
    """The main measurement again, speculating: its runs, and its drafts' totals over every run (greedy
    runs of one prompt draft alike, so the warmup changes no ratio)."""

    run: RunStats
    drafts: SpecStats


@dataclass(frozen=True)
class ModelBench:
    """One checkpoint's results. `error` is set (and `main` None) when it could not be loaded or run;
    `contexts[c]` is the measurement at a c-token prompt, or the error that stopped it."""

    name: str
    path: str
    error: str | None = None
    size_bytes: int | None = None
    parameters: int | None = None
    bits_per_weight: float | None = None
    main: RunStats | None = None
    contexts: dict[int, RunStats | str] = field(default_factory=dict)
    batches: dict[int, BatchStats | str] = field(default_factory=dict)
    bytes_per_token: int | None = None  # what a batch-1 decode step of the main run reads (module docstring)
    speculative: SpecBench | str | None = None  # with a draft model: the speculative run, or its error
    routed_per_rank: list[int] | None = None  # under --ep: (token, expert) pairs each rank's experts served
    routed_per_expert: list[list[int]] | None = None  # ... and by layer and expert (for --ep-placement)


@dataclass(frozen=True)
class BenchReport:
    """All models of one `bench` call, with the settings and the machine they were measured on."""

    models: tuple[ModelBench, ...]
    settings: dict[str, Any]
    system: dict[str, Any]

    @property
    def context(self) -> list[int]:
        return list(self.settings["context"] or [])

    @property
    def sweep_context(self) -> list[int]:
        return list(self.settings["sweep_context"] or [])

    @property
    def batch(self) -> list[int]:
        return list(self.settings.get("batch") or [])

    def report(self) -> Report:
        """The generic report (ossq.report) the renderers take."""
        copy = self.settings.get("copy_bandwidth_gbps")
        rows = tuple(_row(m, self.context, self.batch, copy) for m in self.models)
        speculative = self.settings.get("draft_model") is not None
        return Report(
            "bench",
            "ossq bench",
            self.system,
            self.settings,
            tuple(_metrics(self.context, self.batch, speculative)),
            rows,
            series=self._series(),
        )

    def _series(self) -> tuple[Series, ...]:
        if not self.sweep_context:
            return ()
        x = "context length (tokens)"
        ok = [m for m in self.models if m.error is None]
        decode = {m.name: _points(m, self.sweep_context, lambda s: s.generation_tps) for m in ok}
        prefill = {m.name: _points(m, self.sweep_context, lambda s: s.prompt_tps) for m in ok}
        return (
            Series("decode_vs_context", x, "generation tok/s", decode),
            Series("prefill_vs_context", x, "prompt tok/s", prefill),
        )


def _points(m: ModelBench, lengths: list[int], rate: Callable[[RunStats], Spread]) -> tuple[tuple[float, float], ...]:
    """(context length, median rate) for each length that was measured without error."""
    measured = [(c, m.contexts.get(c)) for c in lengths]
    return tuple((float(c), rate(s).median) for c, s in measured if isinstance(s, RunStats))


# ---- report rows -----------------------------------------------------------------------------------------
def _metrics(context: Sequence[int], batch: Sequence[int], speculative: bool = False) -> list[Metric]:
    metrics = [
        Metric("prompt_tps", "prompt", "tok/s", True, "{:,.1f}"),
        Metric("generation_tps", "generation", "tok/s", True, "{:,.1f}"),
        Metric("ttft_ms", "TTFT", "ms", False, "{:,.1f}"),
        Metric("total_s", "total time", "s", False, "{:.3f}"),
        Metric("peak_memory_gb", "peak memory", "GB", False, "{:.2f}"),
        Metric("tps_per_gb", "generation per GB", "tok/s/GB", True, "{:,.2f}"),
        Metric("bandwidth_pct", "of copy bandwidth", "%", True, "{:.1f}"),
        Metric("size_gb", "size on disk", "GB", False, "{:.3g}"),
        Metric("bits_per_weight", "bits per weight", "", False, "{:.3f}"),
    ]
    for c in context:
        metrics.append(Metric(f"prompt_tps@{c}", f"prompt @{length_label(c)}", "tok/s", True, "{:,.1f}"))
        metrics.append(Metric(f"generation_tps@{c}", f"generation @{length_label(c)}", "tok/s", True, "{:,.1f}"))
    for b in batch:
        metrics.append(Metric(f"batch_tps@{b}", f"generation ×{b} (all)", "tok/s", True, "{:,.1f}"))
        metrics.append(Metric(f"sequence_tps@{b}", f"generation ×{b} (each)", "tok/s", True, "{:,.1f}"))
    if speculative:
        metrics += [
            Metric("spec_generation_tps", "generation, speculative", "tok/s", True, "{:,.1f}"),
            Metric("spec_speedup", "speculative speed-up", "×", True, "{:.2f}"),
            Metric("acceptance_pct", "draft acceptance", "%", True, "{:.1f}"),
            Metric("accepted_per_step", "drafts accepted per step", "tokens", True, "{:.2f}"),
            Metric("drafted_per_step", "drafts per step", "tokens", True, "{:.2f}"),
        ]
    return metrics


def _row(m: ModelBench, context: Sequence[int], batch: Sequence[int], copy_gbps: float | None) -> dict[str, Any]:
    """A flat report row: medians under the metric keys, [min, max] under "range", seconds per phase."""
    row: dict[str, Any] = {"model": m.name, "path": m.path}
    if m.error is not None:
        return {**row, "error": m.error}
    row.update(parameters=m.parameters, size_gb=m.size_bytes / 1e9, bits_per_weight=m.bits_per_weight)
    s = m.main
    spreads = {
        "prompt_tps": s.prompt_tps,
        "generation_tps": s.generation_tps,
        "ttft_ms": s.spread(lambda t: t.ttft * 1e3),
        "total_s": s.spread(lambda t: t.total),
        "decode_s": s.spread(lambda t: t.decode),
    }
    for c in context:
        stats = m.contexts.get(c)
        if isinstance(stats, RunStats):
            spreads[f"prompt_tps@{c}"] = stats.prompt_tps
            spreads[f"generation_tps@{c}"] = stats.generation_tps
    for b in batch:
        stats = m.batches.get(b)
        if isinstance(stats, BatchStats):
            spreads[f"batch_tps@{b}"], spreads[f"sequence_tps@{b}"] = stats.aggregate, stats.per_sequence
    row.update({k: v.median for k, v in spreads.items()})
    row["peak_memory_gb"] = s.peak_memory_gb
    row["tps_per_gb"] = s.generation_tps.median / s.peak_memory_gb
    if m.bytes_per_token and copy_gbps:
        row["decode_gbps"] = m.bytes_per_token * s.generation_tps.median / 1e9
        row["bandwidth_pct"] = 100 * row["decode_gbps"] / copy_gbps
    if isinstance(m.speculative, SpecBench):
        spreads["spec_generation_tps"] = m.speculative.run.generation_tps
        row.update(_speculative_figures(m.speculative, s))
    row["range"] = {k: [v.min, v.max] for k, v in spreads.items()}
    failed = {str(c): e for c, e in m.contexts.items() if isinstance(e, str)}
    failed |= {f"batch {b}": e for b, e in m.batches.items() if isinstance(e, str)}
    if isinstance(m.speculative, str):
        failed["speculative"] = m.speculative
    if failed:
        row["context_errors"] = failed
    if m.routed_per_rank is not None:
        row["routed_per_rank"], row["routed_per_expert"] = m.routed_per_rank, m.routed_per_expert
    return row


def _speculative_figures(spec: SpecBench, plain: RunStats) -> dict[str, float]:
    drafts = spec.drafts
    return {
        "spec_generation_tps": spec.run.generation_tps.median,
        "spec_speedup": spec.run.generation_tps.median / plain.generation_tps.median,
        "acceptance_pct": 100 * drafts.acceptance_rate,
        "accepted_per_step": drafts.mean_accepted_length,
        "drafted_per_step": drafts.mean_draft_length,
    }


# ---- measuring ---------------------------------------------------------------------------------------------
def prompt_ids(n: int, *, vocab_size: int, seed: int) -> list[int]:
    """`n` ordinary-token ids (below 199998 and the vocabulary), the same for the same (n, vocab, seed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, N_RANKS), (n,), generator=gen).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_run(engine: Engine, prompt: Sequence[int], gen_tokens: int) -> Timing:
    """One request: prefill `prompt`, sample greedily, then decode `gen_tokens − 1` more tokens, no stop."""
    device = engine.model.device
    _sync(device)
    start = time.perf_counter()
    rid = engine.add_request(prompt, max_tokens=gen_tokens)
    first = None
    for out in engine.stream(rid):
        if first is None and out.token is not None:
            first = time.perf_counter()  # the step has read its token back: the device is done
    _sync(device)
    end = time.perf_counter()
    engine.release(rid)
    return Timing(ttft=first - start, decode=end - first)


def time_batch(engine: Engine, prompts: Sequence[Sequence[int]], gen_tokens: int) -> float:
    """All `prompts` at once → aggregate generation tok/s once every request has its first token."""
    rids = [engine.add_request(p, max_tokens=gen_tokens) for p in prompts]
    waiting, since, count = set(rids), None, 0
    while engine.has_unfinished:
        for out in engine.step():
            if out.token is not None:
                waiting.discard(out.request_id)
                count += since is not None
        if since is None and not waiting:
            since = time.perf_counter()
    end = time.perf_counter()
    for rid in rids:
        engine.release(rid)
    return count / (end - since)


def measure(
    engine: Engine, prompt: Sequence[int], *, gen_tokens: int, repeats: int, warmup: int, meter: MemoryMeter
) -> RunStats:
    """`warmup` discarded runs, then `repeats` timed ones; the meter is read (not reset) at the end."""
    for _ in range(warmup):
        time_run(engine, prompt, gen_tokens)
    runs = tuple(time_run(engine, prompt, gen_tokens) for _ in range(repeats))
    return RunStats(len(prompt), gen_tokens, runs, meter.peak_gb())


def decode_bytes_per_token(model: torch.nn.Module, context: float) -> int:
    """Bytes a batch-1 decode step reads at a `context`-token cache (module docstring: every weight,
    top_k of E experts, one embedding row, and the keys and values each layer attends over)."""
    c = model.config
    total = 0.0
    for name, buf in model.named_buffers():
        if ".experts." in name:
            total += buf.nbytes * c.num_experts_per_tok / c.num_local_experts
        elif name.startswith("model.embed_tokens."):
            total += buf.nbytes / c.vocab_size
        else:
            total += buf.nbytes
    positions = sum(min(context, c.window(i) or context) for i in range(c.num_hidden_layers))
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return round(total + positions * 2 * c.num_key_value_heads * c.head_dim * itemsize)


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """GB/s of a device-to-device copy of `nbytes` (default 1 GiB on a GPU, 256 MiB on the CPU), bytes
    read plus bytes written: the bound a decode step's reads approach. The median of `repeats`."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    _free(device)
    return 2 * nbytes / statistics.median(times) / 1e9


def checkpoint_facts(ckpt: Checkpoint) -> tuple[int, int, float]:
    """(bytes of the safetensors files, parameters, bits per weight) of a checkpoint as stored. Parameters
    and bits per weight follow mlx-lm (ossq.quant.recipe.Plan), so they equal what mlx-lm reports."""
    size = sum(p.stat().st_size for p in {t.shard for t in ckpt.files.tensors.values()})
    stored = Plan(Recipe("as stored", QuantSpec(), ()), ckpt.config, ckpt.specs)
    return size, stored.total_parameters, stored.bits_per_weight


# ---- the command -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    prompt_tokens: int
    gen_tokens: int
    lengths: list[int]
    batch: list[int]
    repeats: int
    warmup: int
    seed: int
    device: torch.device
    engine: EngineConfig
    ops: str | None
    log: Callable[[str], None]
    parallel: Parallel = SINGLE
    draft_model: str | None = None  # speculate with this too (module docstring)
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS


def _bench_model(name: str, ckpt: Checkpoint, job: _Job) -> ModelBench:
    """Load one model, measure it, free it. A failure to load or run becomes the row's error."""
    meter = MemoryMeter(job.device)
    meter.reset()
    model = engine = None
    path = str(ckpt.root)
    try:
        job.log(f"{name}: loading")
        size, params, bpw = checkpoint_facts(ckpt)
        parallel = job.parallel
        if parallel.lockstep:  # count where the tokens went
            shape = (ckpt.config.num_hidden_layers, ckpt.config.num_local_experts)
            routed = torch.zeros(shape, dtype=torch.int64, device=job.device)
            parallel = replace(parallel, routed=routed)
        model, _ = load(ckpt.root, device=str(job.device), ops=job.ops, parallel=parallel)
        engine = Engine(model, job.engine)
        job.log(
            f"{name}: {job.prompt_tokens}-token prompt, {job.gen_tokens} tokens, {job.repeats} repeats, "
            f"KV cache {engine.kv_cache_tokens:,} tokens"
        )
        main = _at_context(engine, job.prompt_tokens, job, meter, name)
        if isinstance(main, str):
            return ModelBench(name, path, error=main)
        contexts = {c: _at_context(engine, c, job, meter, name) for c in job.lengths}
        batches = {b: _at_batch(engine, b, job, name) for b in job.batch}
        read = decode_bytes_per_token(model, job.prompt_tokens + job.gen_tokens / 2)
        del engine  # its KV pool, before the speculative engine makes two
        engine = None
        spec = _speculative(model, job, meter, name) if job.draft_model is not None else None
        routed = parallel.routed_per_rank()
        if routed is not None:
            job.log(f"{name}: (token, expert) pairs per rank: {', '.join(f'{n:,}' for n in routed)}")
        result = ModelBench(name, path, None, size, params, bpw, main, contexts, batches, read, spec, routed)
        return replace(result, routed_per_expert=parallel.routed_per_expert())
    except MODEL_ERRORS as e:
        job.log(f"{name}: [red]{_describe(e)}[/red]")
        return ModelBench(name, path, error=_describe(e))
    finally:
        del model, engine
        _free(job.device)


def _at_context(engine: Engine, c: int, job: _Job, meter: MemoryMeter, name: str) -> RunStats | str:
    if c != job.prompt_tokens:
        job.log(f"{name}: decode at a {length_label(c)}-token context")
        meter.reset()
    try:
        prompt = prompt_ids(c, vocab_size=engine.model.config.vocab_size, seed=job.seed)
        return measure(engine, prompt, gen_tokens=job.gen_tokens, repeats=job.repeats, warmup=job.warmup, meter=meter)
    except MODEL_ERRORS as e:  # e.g. out of memory or past the model's context: keep the other figures
        job.log(f"{name}: at {length_label(c)}: [red]{_describe(e)}[/red]")
        return _describe(e)


def _speculative(model: GptOss, job: _Job, meter: MemoryMeter, name: str) -> SpecBench | str:
    """The main measurement on an engine that speculates with the job's draft, loaded for it and freed
    after it."""
    job.log(f"{name}: speculative decoding, drafts by {job.draft_model}, at most {job.num_draft_tokens} a step")
    draft = None
    try:
        draft = load_draft(job.draft_model, model, ops=job.ops)
        prompt = prompt_ids(job.prompt_tokens, vocab_size=model.config.vocab_size, seed=job.seed)
        counts = dict(gen_tokens=job.gen_tokens, repeats=job.repeats, warmup=job.warmup)
        return measure_speculative(model, draft, job.engine, prompt, job.num_draft_tokens, meter=meter, **counts)
    except MODEL_ERRORS as e:
        job.log(f"{name}: speculative: [red]{_describe(e)}[/red]")
        return _describe(e)
    finally:
        del draft
        _free(job.device)


def measure_speculative(
    model: GptOss,
    draft: GptOss | str,
    config: EngineConfig,
    prompt: Sequence[int],
    num_draft_tokens: int,
    *,
    gen_tokens: int,
    repeats: int,
    warmup: int,
    meter: MemoryMeter,
    adaptive: bool = True,
) -> SpecBench:
    """`measure` on an engine over `model` that speculates with `draft` (a model or "ngram"); `adaptive`
    False drafts K tokens every step (what a verification costs, whatever the acceptance)."""
    engine = speculative_engine(model, config, SpeculativeConfig(draft, num_draft_tokens, adaptive=adaptive))
    run = measure(engine, prompt, gen_tokens=gen_tokens, repeats=repeats, warmup=warmup, meter=meter)
    return SpecBench(run, engine.speculator.stats)


def _at_batch(engine: Engine, size: int, job: _Job, name: str) -> BatchStats | str:
    job.log(f"{name}: {size} concurrent sequences")
    vocab = engine.model.config.vocab_size
    prompts = [prompt_ids(job.prompt_tokens, vocab_size=vocab, seed=job.seed + i) for i in range(size)]
    try:
        for _ in range(job.warmup):
            time_batch(engine, prompts, job.gen_tokens)
        return BatchStats(size, tuple(time_batch(engine, prompts, job.gen_tokens) for _ in range(job.repeats)))
    except MODEL_ERRORS as e:
        job.log(f"{name}: batch {size}: [red]{_describe(e)}[/red]")
        return _describe(e)


def kv_tokens_needed(prompt_tokens: int, gen_tokens: int, lengths: Sequence[int], sizes: Sequence[int]) -> int:
    """A KV pool just large enough for the largest measurement, so peak memory shows what a run needs
    (the engine's default would take most of the GPU's memory whatever the model)."""
    longest = max([prompt_tokens, *lengths]) + gen_tokens
    batch = max([1, *sizes]) * (blocks_for(prompt_tokens + gen_tokens) + 1) * BLOCK_TOKENS
    return max(blocks_for(longest) * BLOCK_TOKENS, batch)


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check(prompt_tokens: int, gen_tokens: int, repeats: int, warmup: int) -> None:
    if prompt_tokens < 1:
        raise InvalidArgument("prompt_tokens", f"prompt_tokens must be at least 1, got {prompt_tokens}")
    if gen_tokens < 2:
        raise InvalidArgument(
            "gen_tokens", f"gen_tokens must be at least 2 (the decode rate needs a step), got {gen_tokens}"
        )
    if repeats < 1:
        raise InvalidArgument("repeats", f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise InvalidArgument("warmup", f"warmup must be at least 0, got {warmup}")


def bench(
    models: Sequence[str],
    *,
    prompt_tokens: int = 90,
    gen_tokens: int = 200,
    context: Sequence[int | str] | str | None = None,
    batch: Sequence[int | str] | str | None = None,
    repeats: int = 5,
    warmup: int = 1,
    device: str | None = None,
    sweep_context: Sequence[int | str] | str | None = None,
    seed: int = 0,
    kv_cache_tokens: int | None = None,
    ops: str | None = None,
    cuda_graphs: bool = True,
    overlap: bool | None = None,
    progress: bool = True,
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    parallel: Parallel = SINGLE,
    draft_model: str | None = None,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
) -> BenchReport:
    """Measure every checkpoint in `models` (directories or hub ids) one after the other; see the module
    docstring for the method. Every model is found and its config read before any is measured. With
    `progress`, log each step to stderr and print the tables at the end. Writes the JSON / Markdown /
    PNG outputs whose paths are given (plots need matplotlib). Under `parallel` (--tp) every rank measures
    its shard in step with the others, on its own device; rank 0 alone logs and writes. Under --ep
    (`parallel.expert_only`) every rank runs the same requests of its own beside the others' (data-parallel
    attention), so the figures are one rank's and the machine's aggregate is N times them. With
    `draft_model` each model's main measurement is repeated speculating (module docstring)."""
    if not models:
        raise InvalidArgument("models", "give at least one model")
    context, sweep_context, sizes = parse_lengths(context), parse_lengths(sweep_context), parse_lengths(batch)
    _check(prompt_tokens, gen_tokens, repeats, warmup)
    if plot_path:
        pyplot()  # fail now, not after the measurements, when matplotlib is missing
    dev = resolve_device(parallel.device or device)
    checkpoints = [Checkpoint(m) for m in models]  # a bad path or config fails here, before any work
    if draft_model is not None:
        _check_draft(draft_model, num_draft_tokens, checkpoints)
    console = _console() if progress and parallel.rank == 0 else None
    lengths = sorted(set(context) | set(sweep_context))
    drafts = num_draft_tokens if draft_model is not None else 0  # room for the drafts past the last token
    kv_tokens = kv_cache_tokens or kv_tokens_needed(prompt_tokens, gen_tokens + drafts, lengths, sizes)
    engine = EngineConfig(
        kv_cache_tokens=kv_tokens,
        max_num_seqs=max([1, *sizes]),
        prefix_cache=False,
        cuda_graphs=cuda_graphs,
        overlap=overlap,
    )
    log = console.log if console else _quiet
    job = _Job(prompt_tokens, gen_tokens, lengths, sizes, repeats, warmup, seed, dev, engine, ops, log, parallel)
    job = replace(job, draft_model=draft_model, num_draft_tokens=num_draft_tokens)
    settings = {
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "context": context,
        "sweep_context": sweep_context,
        "batch": sizes,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "kv_cache_tokens": kv_tokens,
        "ops": ops or "default",
        "cuda_graphs": cuda_graphs,
        "overlap": "default (on CUDA)" if overlap is None else overlap,
        **({"ep": parallel.world_size} if parallel.expert_only else {"tp": parallel.world_size}),
        "copy_bandwidth_gbps": copy_bandwidth_gbps(dev),
        "prompt": "seeded random ordinary-token ids",
        "sampling": "greedy, no stop tokens",
    }
    if draft_model is not None:
        settings.update(draft_model=str(draft_model), num_draft_tokens=num_draft_tokens)
    system = system_info(str(dev))
    results = tuple(_bench_model(n, c, job) for n, c in zip(model_names(models), checkpoints, strict=True))
    result = BenchReport(results, settings, system)
    if console:
        print_report(result.report())
    if parallel.rank == 0:
        write_files(result.report(), json_path=json_path, markdown_path=markdown_path, plot_path=plot_path)
    return result


def _check_draft(draft_model: str, k: int, checkpoints: Sequence[Checkpoint]) -> None:
    """A draft every model can use: K ≥ 1, and a checkpoint's vocabulary theirs."""
    check_num_draft_tokens(k)
    if draft_model != NGRAM:
        draft = read_model_config(resolve(draft_model))[1]
        for ckpt in checkpoints:
            check_draft_config(ckpt.config, draft)


def _quiet(_message: str) -> None:
    pass


def _console():
    from rich.console import Console

    return Console(stderr=True)
