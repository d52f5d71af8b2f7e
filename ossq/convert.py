"""gpt-oss checkpoint → MLX-format (quantized) checkpoint that mlx-lm loads unchanged, streamed.

The counterpart of `mlx_lm.convert` (shared spec formats.md §3): the same flags make the same choices —
which modules get which (bits, group_size, mode), which are skipped, how experts that the source already
stores as MXFP4 are treated — and the weights come out byte-identical to mlx-lm's (CPU `mx.quantize` is
the bit-exact target, quant/affine.py). Sources: the published MXFP4 layout, transformers' bf16 layout and
MLX checkpoints, all read through `formats.hf.Checkpoint` under MLX names.

Memory bound: tensors are read, transformed and written one at a time — experts one expert slice at a
time — straight into their place in the output shard (formats.mlx.ShardWriter writes every header first,
so nothing is buffered). Peak memory above the interpreter's baseline is about the largest single unit —
a whole non-expert tensor or one expert slice — held at most three ways at once (as read, decoded or
cast, and quantized), plus the quantizers' fixed chunk temporaries (≲ 100 MB). It does not grow with the
model: for gpt-oss-20b and -120b the largest unit is the bf16 embedding (and lm_head), 201088 × 2880 × 2 B
= 1.16 GB, plus 0.36 GB for its 4-bit form. tests/test_convert.py checks the bound on a model many times
larger than it; benchmarks/convert-results.md has the full-size figure.

Safety: every option, the recipe and the source (headers, shapes, sizes) are checked before anything is
written; output goes to a hidden directory next to the destination (formats.mlx.staging) and is renamed
into place only when complete, so a failure (a truncated shard, a full disk, Ctrl-C, or the SIGTERM and
SIGHUP that the CLI turns into exceptions) leaves neither destination nor temp dir. What only SIGKILL or a
power cut can leave behind, the next conversion to the same destination finds and removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ossq.device import peak_rss_bytes, resolve_device
from ossq.errors import OssqError, UnsupportedQuantization
from ossq.formats.hf import Checkpoint
from ossq.formats.mlx import (
    INDEX_FILE,
    TOKENIZER_FILES,
    LinearInfo,
    ShardWriter,
    TensorEntry,
    check_creatable,
    config_json,
    expected_tensors,
    layer_prefix,
    linear_modules,
    overwrite_tensors,
    quantization_entries,
    remove_stale_staging,
    shard_plan,
    staging,
    write_order,
)
from ossq.quant import affine, allocate, awq, dwq, gptq, mxfp4
from ossq.quant.recipe import Plan, Recipe, plan, render_table, resolve
from ossq.quant.spec import QuantSpec

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
EXPERTS = ("keep", "quantize")
CALIBRATIONS = ("gptq", "awq")
MLP_FOLD = ("mlp.router", "mlp.experts.gate_proj", "mlp.experts.up_proj")  # what reads post_attention_layernorm
METADATA_BYTES = 64 << 20  # headroom for config, index and tokenizer files in the free-disk check
Advance = Callable[..., None]  # advance() one unit; advance("text") shows what runs now


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion did (or, for a dry run, would do). Sizes in bytes; `output_bytes` is what the
    destination holds on disk (a dry run: the planned tensor bytes); `bits_per_weight` and
    `total_parameters` use mlx-lm's definitions (formats.md §3.4); `peak_rss_gb` is the process's peak
    resident set (1e9 bytes)."""

    path: Path
    seconds: float
    source_bytes: int
    output_bytes: int
    total_parameters: int
    bits_per_weight: float
    shards: int
    peak_rss_gb: float
    skipped: tuple[str, ...] = ()
    dry_run: bool = False
    distilled: dwq.Result | None = None  # what --distill did

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        text = (
            f"{verb} {self.path}: {self.output_bytes / 1e9:.2f} GB in {self.shards} shard(s) from "
            f"{self.source_bytes / 1e9:.2f} GB, {self.bits_per_weight:.3f} bits per weight, "
            f"{self.total_parameters:,} parameters, {self.seconds:.1f} s, peak RSS {self.peak_rss_gb:.2f} GB"
        )
        if self.distilled:
            d = self.distilled
            text += (
                f"; distilled: held-out KL {d.kl_before:.5f} → {d.kl_after:.5f} (step {d.best_step} of "
                f"{d.steps}, {d.train_tokens:,} tokens trained on, {d.valid_tokens:,} held out, {d.seconds:.0f} s)"
            )
        return text


@dataclass(frozen=True)
class Job:
    """Everything decided before the first byte is written.

    `plan.specs` is each module's output storage, `source` its storage in the source; modules in
    `passthrough` are stored identically in both and are copied, not re-quantized. `dtype` casts every
    floating tensor (mlx-lm's --dtype). `entries` lists every output tensor in write order."""

    plan: Plan
    source: dict[str, QuantSpec | None]
    passthrough: frozenset[str]
    dtype: torch.dtype | None
    entries: tuple[TensorEntry, ...]
    quantization: dict[str, Any] | None
    device: torch.device = torch.device("cpu")  # where tensors are decoded and quantized; bits are the same
    calibration: Calibration | None = None


@dataclass(frozen=True)
class Calibration:
    """Calibrated quantization: `method` gptq or awq (None: round to nearest; the tokens then only measure
    `--target-bpw`'s sensitivities), over the first `tokens` tokens of `data` (a text file, directory or
    dataset, read as `ossq ppl` reads it)."""

    method: str | None
    data: str
    tokens: int


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    quant_predicate: str | None = None,
    dtype: str | None = None,
    dequantize: bool = False,
    experts: str = "keep",
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    console: Console | None = None,
    device: str | None = None,
    calibrate: str | None = None,
    calib_data: str | None = None,
    calib_tokens: int = 4096,
    target_bpw: float | None = None,
    max_bits: int | None = None,
    distill: int = 0,
    distill_lr: float = dwq.LEARNING_RATE,
) -> ConvertReport:
    """Convert the checkpoint at `hf_path` (directory or hub id) into an MLX checkpoint at `mlx_path`.

    Flags mean what `mlx_lm.convert`'s do (`-q`, `--q-bits`, `--q-group-size`, `--q-mode`,
    `--quant-predicate`, `--dtype`, `-d`); `quant_predicate` also takes ossq's recipes (`tiered`,
    `mxfp4-experts`) or a recipe file (quant/recipe.py). `experts="keep"` leaves experts that the source
    stores quantized (the published MXFP4) as they are, as mlx-lm does; `"quantize"` decodes them and
    quantizes them by the recipe. An existing `mlx_path` is refused unless `force`. `dry_run` prints the
    recipe's table and writes nothing. `device="cuda"` decodes and quantizes on the GPU (same bits: the
    quantizers never turn a division into a reciprocal multiply), several times faster for the experts.
    `calibrate` ("gptq" or "awq") runs the full-precision model over the first `calib_tokens` tokens of
    `calib_data` layer by layer (ossq/calibrate.py) and rounds every affine module with GPTQ, or with AWQ
    scales folded into the norms (quant/gptq.py, quant/awq.py); the output is the same plain MLX affine.
    `target_bpw` chooses each tensor's bits and group (quant/allocate.py), at most `max_bits` bits each
    (None: bf16 allowed); experts the source stores quantized stay so with `experts="keep"`, and with
    `"quantize"` their stored MXFP4 is one of the allocator's choices (it costs no loss). `distill` > 0
    then tunes every affine module's scales and biases for that many steps (Adam at `distill_lr`) against
    the source's next-token distributions on the calibration text (quant/dwq.py), in the staging
    directory, before it is published."""
    from rich.console import Console

    start = time.perf_counter()
    console = console or Console()
    recipe = _recipe(quantize, dequantize, q_bits, q_group_size, q_mode, quant_predicate, experts, dtype)
    calibration = _calibration(calibrate, calib_data, calib_tokens, quantize=quantize, q_mode=q_mode)
    if max_bits is not None and target_bpw is None:
        raise UnsupportedQuantization("--max-bits caps what --target-bpw chooses; pass --target-bpw too")
    if target_bpw is not None:
        _check_target(target_bpw, q_bits, q_group_size, quant_predicate, quantize=quantize, q_mode=q_mode)
        calibration = calibration or _calibration("rtn", calib_data, calib_tokens, quantize=True, q_mode=q_mode)
    if distill:
        calibration = calibration or _calibration(
            "rtn", calib_data, calib_tokens, quantize=quantize, q_mode=q_mode, flag="--distill"
        )
    work_device = resolve_device(device) if device is not None else torch.device("cpu")
    dest = Path(mlx_path).expanduser()
    if Path(hf_path).expanduser().is_dir():  # a hub id is checked once downloaded
        _check_destination(dest, Path(hf_path).expanduser())
    if not dry_run and dest.exists() and not force:
        raise OssqError(f"{dest} already exists; choose another path or pass --force to replace it")
    ckpt = Checkpoint(hf_path)
    try:
        _check_destination(dest, ckpt.root)
        if target_bpw is not None:
            recipe = _allocated(ckpt, target_bpw, max_bits, calibration, experts, work_device, console)
        job = plan_job(
            ckpt,
            recipe,
            quantize=quantize,
            dequantize=dequantize,
            experts=experts,
            dtype=DTYPES.get(dtype or _config_dtype(ckpt.raw_config) or ""),
        )
        job = dataclasses.replace(job, device=work_device, calibration=calibration)
        _warn(console, job, ckpt, recipe, experts)
        if dry_run:
            console.print(render_table(job.plan))
            return _report(job, ckpt, dest, start, output_bytes=job.plan.total_bytes, dry_run=True)
        _check_free_space(dest, job)
        for stale in remove_stale_staging(dest):
            console.print(f"note: removed {stale}, a staging directory left by an earlier conversion that was killed")
        distilled = None
        with staging(dest, replace=force) as tmp:
            with _progress_bar(console, progress, job) as advance:
                _write(ckpt, job, tmp, advance)
            if distill:
                distilled = _distill(ckpt, job, tmp, distill, distill_lr, console, progress)
    finally:
        ckpt.close()
    report = _report(job, ckpt, dest, start, output_bytes=_directory_bytes(dest))
    report = dataclasses.replace(report, distilled=distilled)
    if progress:
        console.print(report.summary())
    return report


# ---- decisions -------------------------------------------------------------------------------------------
def _recipe(
    quantize: bool,
    dequantize: bool,
    q_bits: int | None,
    q_group_size: int | None,
    q_mode: str,
    quant_predicate: str | None,
    experts: str,
    dtype: str | None,
) -> Recipe | None:
    """Validate the flags (before anything is read) and resolve the recipe; None without `quantize`."""
    if experts not in EXPERTS:
        raise OssqError(f"--experts must be one of {', '.join(EXPERTS)}, not {experts!r}")
    if dtype is not None and dtype not in DTYPES:
        raise OssqError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize and dequantize:
        raise OssqError("choose either -q (quantize) or -d (dequantize), not both")
    if quantize:
        return resolve(quant_predicate, bits=q_bits, group_size=q_group_size, mode=q_mode)
    if q_bits is not None or q_group_size is not None or quant_predicate is not None or q_mode != "affine":
        raise UnsupportedQuantization(
            "--q-bits, --q-group-size, --q-mode and --quant-predicate apply only with -q (quantize)"
        )
    if experts == "quantize":
        raise UnsupportedQuantization(
            "--experts quantize needs -q (quantize); to decode the experts to bf16 use -d (dequantize)"
        )
    return None


def _calibration(
    method: str | None, data: str | None, tokens: int, *, quantize: bool, q_mode: str, flag: str | None = None
) -> Calibration | None:
    """Validate the calibration flags before anything is read; method "rtn" (only `--target-bpw`'s
    measurements or `--distill`'s text, named by `flag`) is the Calibration without a method."""
    if method is None:
        return None
    if method not in (*CALIBRATIONS, "rtn"):
        raise OssqError(f"--calibrate must be one of {', '.join(CALIBRATIONS)}, not {method!r}")
    flag = flag or ("--target-bpw" if method == "rtn" else f"--calibrate {method}")
    if not quantize:
        raise UnsupportedQuantization(f"{flag} needs -q (quantize)")
    if q_mode != "affine":
        raise UnsupportedQuantization(f"{flag} calibrates affine quantization, not --q-mode {q_mode}")
    if data is None:
        raise OssqError(f"{flag} needs --calib-data FILE (text to run the model on)")
    if tokens < 16:
        raise OssqError(f"--calib-tokens must be at least 16, got {tokens}")
    return Calibration(None if method == "rtn" else method, data, tokens)


def _check_target(
    target: float, q_bits: int | None, q_group_size: int | None, predicate: str | None, *, quantize: bool, q_mode: str
) -> None:
    if not quantize:
        raise UnsupportedQuantization("--target-bpw needs -q (quantize)")
    if q_bits is not None or q_group_size is not None or predicate is not None or q_mode != "affine":
        raise UnsupportedQuantization(
            "--target-bpw chooses every tensor's bits and group size; drop --q-bits, --q-group-size, "
            "--q-mode and --quant-predicate"
        )
    if not target > 0:
        raise OssqError(f"--target-bpw must be positive, got {target}")


def _allocated(
    ckpt: Checkpoint,
    target: float,
    max_bits: int | None,
    calibration: Calibration,
    experts: str,
    device: torch.device,
    console: Console,
) -> Recipe:
    """The recipe `--target-bpw` chooses from sensitivities measured on the calibration text
    (quant/allocate.py); one full-precision walk over the layers, before anything is written."""
    from ossq.calibrate import Forward, Tokens

    mods = linear_modules(ckpt.config)
    stored = {m.path: spec for m in mods if (spec := ckpt.specs[m.path]) is not None}
    pinned = frozenset(m.path for m in mods if experts == "keep" and m.experts and m.path in stored)
    space = allocate.Space(max_bits, stored, pinned)
    allocate.check_target(ckpt.config, target, space)
    ids = calibration_tokens(calibration, ckpt.config.vocab_size)
    console.print(f"measuring sensitivities on {len(ids):,} calibration tokens, layer by layer")
    forward = Forward(_dense_reader(ckpt, ckpt.specs, device), ckpt.config, Tokens.of(ids, device))
    options = allocate.sensitivities(forward, ckpt.config, space, calibrated=calibration.method == "gptq")
    return allocate.recipe(allocate.allocate(options, allocate.module_budget(ckpt.config, target)), target)


def _distill(
    ckpt: Checkpoint, job: Job, directory: Path, steps: int, lr: float, console: Console, progress: bool
) -> dwq.Result:
    """`--distill`: the checkpoint just written to `directory` (staging) tuned against the source on the
    calibration text (quant/dwq.py), its scales and biases written over themselves in place."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    assert job.calibration is not None
    ids = calibration_tokens(job.calibration, ckpt.config.vocab_size)
    written = Checkpoint(directory)
    try:
        student = dwq.Student(
            written.config, written.specs, written.read, _dense_reader(written, written.specs, job.device), job.device
        )
        spans = {n: (t.shard, *t.span) for n, t in written.files.tensors.items()}
    finally:
        written.close()
    console.print(f"distilling {len(student.pairs)} modules' scales and biases on {len(ids):,} calibration tokens")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("distilling", total=steps)

        def on_step(step: int, kl: float | None) -> None:
            bar.update(task, completed=step, description=None if kl is None else f"distilling, held-out KL {kl:.5f}")

        teacher = _dense_reader(ckpt, ckpt.specs, job.device)
        result = dwq.distill(student, teacher, ids, steps=steps, lr=lr, device=job.device, on_step=on_step)
    overwrite_tensors(spans, student.stored())
    return result


def _config_dtype(raw: dict[str, Any]) -> str | None:
    """mlx-lm's default for --dtype: the config's `torch_dtype`, else `text_config.dtype` (gpt-oss's
    published config has neither, so nothing is cast)."""
    text_config = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    value = raw.get("torch_dtype") or text_config.get("dtype")
    return value if value in DTYPES else None


def plan_job(
    ckpt: Checkpoint,
    recipe: Recipe | None,
    *,
    quantize: bool,
    dequantize: bool,
    experts: str,
    dtype: torch.dtype | None,
) -> Job:
    """Decide every module's output storage as mlx-lm would (formats.md §3.1, §3.2, §3.5) and the dtype
    and shape of every output tensor."""
    source, config = ckpt.specs, ckpt.config
    if dequantize:
        p = Plan(Recipe("dequantized (bf16)", QuantSpec(), ()), config, dict.fromkeys(source))
    elif not quantize:
        p = Plan(Recipe("as stored", _source_top(ckpt) or QuantSpec(), ()), config, dict(source))
    else:
        assert recipe is not None
        p = _quantize_plan(recipe, ckpt, keep_experts=experts == "keep")
    passthrough = frozenset(path for path, s in p.specs.items() if s is not None and s == source[path])
    p = dataclasses.replace(p, passthrough=passthrough)
    # mlx-lm writes an entry for every module it newly quantizes when the source was already quantized
    # (its config has `quantization`), and for every module a dict-returning predicate (mixed_*) names.
    kept = (
        quantize and experts == "keep" and any(m.experts and source[m.path] is not None for m in linear_modules(config))
    )
    explicit = (
        frozenset()
        if not quantize or not (kept or p.recipe.explicit_entries)
        else frozenset(path for path, s in p.specs.items() if s is not None and path not in passthrough)
    )
    quantization = None
    if any(s is not None for s in p.specs.values()):
        quantization = quantization_entries(p.top, p.specs, explicit=explicit, group_size_null=p.recipe.group_size_null)
    job = Job(p, source, passthrough, dtype, (), quantization)
    job = dataclasses.replace(job, entries=tuple(_entries(ckpt, job)))
    ckpt.close()  # the dtype probes mapped pages of every shard; reading reopens what it needs
    return job


def _quantize_plan(recipe: Recipe, ckpt: Checkpoint, *, keep_experts: bool) -> Plan:
    """The recipe's plan, except that with `keep_experts` experts the source stores quantized stay as
    stored — mlx-lm never re-quantizes a quantized module — and the top level becomes theirs, which is
    what mlx-lm's config says when it starts from the published MXFP4 checkpoint (§3.2)."""
    p = plan(recipe, ckpt.config)
    kept = {
        m.path: ckpt.specs[m.path]
        for m in linear_modules(ckpt.config)
        if keep_experts and m.experts and ckpt.specs[m.path] is not None
    }
    if not kept:
        return p
    top = next(iter(kept.values()))
    return Plan(
        dataclasses.replace(recipe, top=top),
        p.config,
        {**p.specs, **kept},
        tuple(path for path in p.skipped if path not in kept),
    )


def _source_top(ckpt: Checkpoint) -> QuantSpec | None:
    """The top-level entry of the source's quantization (MLX config, or MXFP4 for the published layout)."""
    quant = ckpt.raw_config.get("quantization")
    if ckpt.layout == "mlx" and isinstance(quant, dict):
        return QuantSpec.from_config(quant)
    return next((s for s in ckpt.specs.values() if s is not None), None)


def _entries(ckpt: Checkpoint, job: Job) -> Iterator[TensorEntry]:
    """Every output tensor in mlx-lm's order with its dtype and shape, known before any is produced."""
    shapes = expected_tensors(ckpt.config, job.plan.specs)
    for item in write_order(ckpt.config):
        if isinstance(item, str):
            yield TensorEntry(item, _float_dtype(ckpt, item, job.dtype), shapes[item])
            continue
        for name, dtype in _module_dtypes(ckpt, item, job).items():
            yield TensorEntry(name, dtype, shapes[name])


def _module_dtypes(ckpt: Checkpoint, mod: LinearInfo, job: Job) -> dict[str, torch.dtype]:
    """Packed weights uint32, MXFP4 scales uint8; affine scales/biases and unquantized weights in the dtype
    the weight is quantized from (decoded MXFP4: bf16, decoded affine: its scales' dtype), or the cast
    dtype; biases as stored (or cast). Copied modules keep their stored dtypes."""
    copied = mod.path in job.passthrough
    spec = job.source[mod.path] if copied else job.plan.specs[mod.path]
    work = None if copied else _work_dtype(ckpt, mod.path, job.source[mod.path], job.dtype)
    names = [f"{mod.path}.weight", f"{mod.path}.scales", f"{mod.path}.biases"]
    out: dict[str, torch.dtype] = {}
    if spec is None:
        out[names[0]] = work
    else:
        out[names[0]] = torch.uint32
        if spec.mode == "mxfp4":
            out[names[1]] = torch.uint8
        else:
            float_dtype = _float_dtype(ckpt, names[1], job.dtype) if copied else work
            out[names[1]] = out[names[2]] = float_dtype
    if mod.bias:
        out[f"{mod.path}.bias"] = _float_dtype(ckpt, f"{mod.path}.bias", job.dtype)
    return out


def _work_dtype(ckpt: Checkpoint, path: str, source: QuantSpec | None, cast: torch.dtype | None) -> torch.dtype:
    if cast is not None:
        return cast
    if source is None:
        return _float_dtype(ckpt, f"{path}.weight", None)
    return torch.bfloat16 if source.mode == "mxfp4" else _float_dtype(ckpt, f"{path}.scales", None)


def _float_dtype(ckpt: Checkpoint, name: str, cast: torch.dtype | None) -> torch.dtype:
    """`cast`, else the stored dtype of `name`, learnt from its first row (or first expert's slice)."""
    return cast if cast is not None else ckpt.read(name, 0).dtype


def _warn(console: Console, job: Job, ckpt: Checkpoint, recipe: Recipe | None, experts: str) -> None:
    p = job.plan
    if p.skipped:
        mods = {m.path: m for m in linear_modules(ckpt.config)}
        widths = sorted({mods[path].in_features for path in p.skipped})
        group = recipe.skip_group if recipe else None
        console.print(
            f"[yellow]warning:[/] group size {group} does not divide the rows ({widths} wide) of "
            f"{len(p.skipped)} modules, e.g. {p.skipped[0]}; they stay unquantized, as mlx-lm "
            "leaves them"
        )
    if recipe is not None and experts == "keep":
        wanted = plan(recipe, ckpt.config).specs
        kept = [
            m.path
            for m in linear_modules(ckpt.config)
            if m.experts and m.path in job.passthrough and wanted[m.path] != job.source[m.path]
        ]
        if kept:
            console.print(
                f"note: {len(kept)} expert modules stay as the source stores them "
                f"({job.source[kept[0]].mode}), as mlx-lm keeps them; pass --experts quantize "
                "to quantize them by the recipe"
            )
    requantized = [
        m.path
        for m in linear_modules(ckpt.config)
        if not m.experts
        and p.specs[m.path] is not None
        and job.source[m.path] is not None
        and m.path not in job.passthrough
    ]
    if requantized:
        console.print(
            f"[yellow]warning:[/] re-quantizing {len(requantized)} modules the source already stores "
            f"quantized (e.g. {requantized[0]}); errors compound — convert from the original "
            "checkpoint if you can"
        )


# ---- writing ---------------------------------------------------------------------------------------------
def _check_destination(dest: Path, source: Path) -> None:
    """Before anything is read: the destination is not the source (nor inside it) and can be created."""
    if dest.resolve() == source.resolve() or source.resolve() in dest.resolve().parents:
        raise OssqError(f"{dest}: the destination must not be the source checkpoint or lie inside it")
    check_creatable(dest, "--mlx-path")


def _check_free_space(dest: Path, job: Job) -> None:
    anchor = dest.parent
    while not anchor.exists():
        anchor = anchor.parent
    need = sum(e.nbytes for e in job.entries) + METADATA_BYTES
    free = shutil.disk_usage(anchor).free
    if free < need:
        raise OssqError(f"{anchor}: {free / 1e9:.1f} GB free, the converted checkpoint needs {need / 1e9:.1f} GB")


def _write(ckpt: Checkpoint, job: Job, directory: Path, advance: Advance) -> None:
    writer = ShardWriter(directory, list(job.entries))
    calibrated = _Calibrated(ckpt, job, advance) if job.calibration and job.calibration.method else None
    try:
        for item in write_order(ckpt.config):
            folded = calibrated.plain(item) if calibrated and isinstance(item, str) else None
            if isinstance(item, str):
                writer.append(item, _cast(ckpt.read(item), job.dtype) if folded is None else folded)
                advance()
            elif calibrated and calibrated.encodes(item):
                _write_encoded(ckpt, item, calibrated.encode(item), job, writer, advance)
            else:
                _write_module(ckpt, item, job, writer, advance)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    total_parameters = job.plan.total_parameters
    (directory / INDEX_FILE).write_text(json.dumps(writer.index(total_parameters), indent=4))
    _write_config(ckpt, job, directory)


def _write_module(ckpt: Checkpoint, mod: LinearInfo, job: Job, writer: ShardWriter, advance: Advance) -> None:
    """One module, one expert at a time: copied as stored, or decoded to dense and encoded by its spec."""
    path, spec = mod.path, job.plan.specs[mod.path]
    for e in range(mod.experts) if mod.experts else (None,):
        if path in job.passthrough:
            parts = ("weight", "scales") if spec.mode == "mxfp4" else ("weight", "scales", "biases")
            tensors = {p: _cast(ckpt.read(f"{path}.{p}", e), job.dtype) for p in parts}
        else:
            tensors = _encode(_dense(ckpt, path, job.source[path], e, job.dtype, job.device), spec)
        for part, t in tensors.items():
            writer.append(f"{path}.{part}", t.cpu())
        ckpt.close()  # unmap: the pages safetensors maps to read a slice count toward RSS until unmapped
        advance()
    if mod.bias:
        writer.append(f"{path}.bias", _cast(ckpt.read(f"{path}.bias"), job.dtype))


def _write_encoded(
    ckpt: Checkpoint, mod: LinearInfo, tensors: dict[str, torch.Tensor], job: Job, writer: ShardWriter, advance: Advance
) -> None:
    """A module encoded whole (all its experts at once), appended one expert slice at a time."""
    for e in range(mod.experts) if mod.experts else (None,):
        for part, t in tensors.items():
            writer.append(f"{mod.path}.{part}", (t if e is None else t[e]).cpu())
        advance()
    if mod.bias:
        writer.append(f"{mod.path}.bias", _cast(ckpt.read(f"{mod.path}.bias"), job.dtype))


def _dense(
    ckpt: Checkpoint,
    path: str,
    source: QuantSpec | None,
    expert: int | None,
    dtype: torch.dtype | None,
    device: torch.device,
) -> torch.Tensor:
    """The module's weight (or one expert's) as floats: decoded MXFP4 is exact in bf16; decoded affine is
    `scale·q + bias` rounded once to the scales' dtype (mlx-lm's CPU -d rounds twice, formats.md §1.4)."""
    w = ckpt.read(f"{path}.weight", expert).to(device)
    if source is None:
        return _cast(w, dtype)
    scales = ckpt.read(f"{path}.scales", expert).to(device)
    if source.mode == "mxfp4":
        return mxfp4.decode(w, scales, dtype=dtype or torch.bfloat16)
    biases = ckpt.read(f"{path}.biases", expert).to(device)
    return affine.dequantize(
        w, scales, biases, bits=source.bits, group_size=source.group_size, dtype=dtype or scales.dtype
    )


def _encode(w: torch.Tensor, spec: QuantSpec | None) -> dict[str, torch.Tensor]:
    if spec is None:
        return {"weight": w}
    if spec.mode == "mxfp4":
        wq, scales = mxfp4.quantize(w)
        return {"weight": wq, "scales": scales}
    wq, scales, biases = affine.quantize(w, bits=spec.bits, group_size=spec.group_size)
    return {"weight": wq, "scales": scales, "biases": biases}


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _write_config(ckpt: Checkpoint, job: Job, directory: Path) -> None:
    """config.json as mlx-lm writes it; tokenizer files and generation_config.json copied byte for byte."""
    generation = ckpt.root / "generation_config.json"
    eos = None
    if generation.is_file():
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            eos = json.loads(generation.read_text()).get("eos_token_id")
    config = config_json(ckpt.raw_config, eos_token_id=eos, quantization=job.quantization)
    (directory / "config.json").write_text(json.dumps(config, indent=4))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (ckpt.root / name).is_file():
            shutil.copyfile(ckpt.root / name, directory / name)


@contextlib.contextmanager
def _progress_bar(console: Console, enabled: bool, job: Job) -> Iterator[Advance]:
    """A rich bar advancing once per tensor, or per expert slice inside an expert module."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    units = sum(1 if isinstance(i, str) else (i.experts or 1) for i in write_order(job.plan.config))
    bar: Progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
    with bar:
        task = bar.add_task("converting", total=units)

        def advance(description: str | None = None) -> None:
            bar.update(task, advance=0 if description else 1, description=description or "converting")

        yield advance


# ---- calibrated encoding ---------------------------------------------------------------------------------
class _Calibrated:
    """Modules encoded from calibration statistics, layer by layer in write order (ossq/calibrate.py):
    holds one layer's full-precision weights and input Hessians at a time. GPTQ rounds each affine
    module against its H; AWQ folds searched scales into the norms (q/k/v behind input_layernorm; router,
    gate and up behind post_attention_layernorm, unless those experts are copied as stored) and rounds
    to nearest. The embedding has no input to calibrate on and is rounded to nearest."""

    def __init__(self, ckpt: Checkpoint, job: Job, advance: Advance) -> None:
        from ossq.calibrate import Forward, Tokens

        assert job.calibration is not None
        self.ckpt, self.job, self.advance, self.method = ckpt, job, advance, job.calibration.method
        ids = calibration_tokens(job.calibration, ckpt.config.vocab_size)
        self._read = _dense_reader(ckpt, job.source, job.device)
        self.forward = Forward(self._read, ckpt.config, Tokens.of(ids, job.device))
        self.layers = self.forward.layers()
        self.layer, self.weights, self.hessians, self.folded = -1, {}, None, set()

    def encodes(self, mod: LinearInfo) -> bool:
        return mod.kind != "embed_tokens" and mod.path not in self.job.passthrough

    def plain(self, name: str) -> torch.Tensor | None:
        """A norm weight as AWQ folded it (in its output dtype), or None when it is stored as read."""
        layer = _layer_of(name)
        if layer is None or self.method != "awq":
            return None
        self._advance(layer)
        key = name.removeprefix(f"{layer_prefix(layer)}.")
        return self.weights[key].to(_float_dtype(self.ckpt, name, self.job.dtype)).cpu() if key in self.folded else None

    def encode(self, mod: LinearInfo) -> dict[str, torch.Tensor]:
        """The module's stored tensors (weight, scales, biases), every expert at once."""
        if mod.layer is None:  # lm_head, whose input is the final norm's output
            w, h = self._read(f"{mod.path}.weight", None).float(), self._final_hessian()
        else:
            self._advance(mod.layer)
            w = self.weights[f"{mod.path.removeprefix(layer_prefix(mod.layer) + '.')}.weight"]
            h = self.hessians.of(mod.kind)
        spec = self.job.plan.specs[mod.path]
        w = w.to(_work_dtype(self.ckpt, mod.path, self.job.source[mod.path], self.job.dtype))
        if self.method == "gptq" and spec is not None and spec.mode == "affine":
            wq, scales, biases = gptq.quantize(w, h, bits=spec.bits, group_size=spec.group_size)
            return {"weight": wq, "scales": scales, "biases": biases}
        return _encode(w, spec)

    def _advance(self, layer: int) -> None:
        while self.layer < layer:
            self.advance(f"calibrating layer {self.layer + 1}")
            self.layer, self.weights, self.hessians = next(self.layers)
            if self.method == "awq":
                self._fold()
            self.advance("converting")

    def _final_hessian(self) -> torch.Tensor:
        self.weights, self.hessians = {}, None
        for _ in self.layers:  # the rest of the walk (it moves the stream past the last layer)
            pass
        x = self.forward.final()
        return x.T @ x

    def _fold(self) -> None:
        """AWQ: each norm's scales searched over the linears that read it, folded into norm and weights."""
        from ossq.calibrate import ATTN

        groups = (
            ("input_layernorm.weight", [f"self_attn.{m}" for m in ATTN], self.hessians.attn),
            ("post_attention_layernorm.weight", MLP_FOLD, self.hessians.mlp),
        )
        self.folded = set()
        for norm, mods, shared in groups:
            paths = [f"{layer_prefix(self.layer)}.{m}" for m in mods]
            if any(p in self.job.passthrough for p in paths):
                continue  # experts copied as stored cannot absorb a scale
            weights = [self.weights[f"{m}.weight"] for m in mods]
            hessians = [self.hessians.of(m.rsplit(".", 1)[1]) for m in mods]
            rms = awq.channel_rms(shared, len(self.forward.tokens.ids))
            s = awq.search(weights, hessians, [self.job.plan.specs[p] for p in paths], rms=rms)
            self.weights[norm], scaled = awq.fold(self.weights[norm], weights, s)
            self.weights.update({f"{m}.weight": w for m, w in zip(mods, scaled, strict=True)})
            self.folded.add(norm)


def _dense_reader(
    ckpt: Checkpoint, source: dict[str, QuantSpec | None], device: torch.device
) -> Callable[[str, int | None], torch.Tensor]:
    """calibrate.Read over the checkpoint: module weights decoded to floats, other tensors as stored."""

    def read(name: str, expert: int | None) -> torch.Tensor:
        path, part = name.rsplit(".", 1)
        if part == "weight" and path in source:
            return _dense(ckpt, path, source[path], expert, None, device)
        return ckpt.read(name, expert).to(device)

    return read


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def calibration_tokens(calibration: Calibration, vocab_size: int) -> list[int]:
    """The calibration stream (o200k_harmony ids, EOS between documents, as `ossq ppl` reads text)."""
    from ossq.perplexity import read_tokens

    ids = read_tokens(calibration.data, max_tokens=calibration.tokens)
    if max(ids) >= vocab_size:
        raise OssqError(
            f"--calib-data: token id {max(ids)} is outside the model's vocabulary of {vocab_size}; calibration "
            "text needs a checkpoint with the o200k_harmony vocabulary"
        )
    return ids


# ---- report ----------------------------------------------------------------------------------------------
def _report(
    job: Job, ckpt: Checkpoint, dest: Path, start: float, *, output_bytes: int, dry_run: bool = False
) -> ConvertReport:
    shards = {info.shard for info in ckpt.files.tensors.values()}
    return ConvertReport(
        path=dest,
        seconds=time.perf_counter() - start,
        source_bytes=sum(s.stat().st_size for s in shards),
        output_bytes=output_bytes,
        total_parameters=job.plan.total_parameters,
        bits_per_weight=job.plan.bits_per_weight,
        shards=len(shard_plan(list(job.entries))),
        peak_rss_gb=peak_rss_bytes() / 1e9,
        skipped=job.plan.skipped,
        dry_run=dry_run,
    )


def _directory_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in path.iterdir() if p.is_file())
