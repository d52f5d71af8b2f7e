"""Measurement reports shared by `ossq bench` and `ossq ppl`: one table row per model, a comparison that
names the winner of every metric, and renderers for the terminal, JSON, Markdown and PNG plots.

The model is deliberately generic, so any measuring command can reuse it:

- a `Metric` says what a number is (`key` in the rows, `label`, `unit`, direction, display `format`);
- a row is a flat dict: `"model"` (its display name), optionally `"error"` (a string: the model failed
  and is shown but never wins), one float (or None = not measured) per metric key, optionally
  `"range": {key: [min, max]}` (the spread of repeated measurements, shown beside the value and as
  whiskers on the bars), and anything else the command wants to keep in the JSON (paths, sizes …);
- a metric that is another's error bar (`Metric.error_of`, or by convention a label starting with "±":
  the error bar of the metric before it) gets no winner and draws whiskers on that metric's bars;
- `comparison(rows, metrics, reference=None)` → one `Comparison` per metric (see its docstring);
- a `Report` bundles kind, title, `system_info()`, the run's settings, metrics, rows, an optional
  reference model (changes in % are relative to it), an optional baseline (a KL reference: the model
  the others are measured against; by default a ppl report's `settings["kl_reference"]`) and optional
  line `Series` (e.g. decode tok/s vs context length). The reference and the baseline are yardsticks:
  shown, marked "ref", never winners;
- renderers: `tables()` / `print_report()` (rich), `to_dict()` / `to_json()`, `to_markdown()`,
  `plot_bars()` and `plot_lines()` (matplotlib, the `plot` extra, imported lazily by `pyplot()`).

JSON schema (`SCHEMA`; bump the number when a key changes meaning or disappears):
`{"schema", "kind", "title", "system", "settings", "reference", "baseline", "metrics": [{key, label,
unit, higher_is_better[, error_of]}], "rows": [row…], "comparison": [Comparison.to_dict()…], "series":
[{name, x_label, y_label, lines: {model: [[x, y]…]}}]}` ("baseline" and "error_of" are additions: old
readers ignore them).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ossq import __version__
from ossq.errors import OssqError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

SCHEMA = "ossq.report/1"
TIE_REL_TOL = 1e-9  # values this close count as equal: both models win


@dataclass(frozen=True)
class Metric:
    """One measured quantity: `key` in the rows, how to show it, and which direction is better.
    `format` is a str.format spec applied to the value, e.g. "{:.1f}" or "{:,.0f}"."""

    key: str
    label: str
    unit: str = ""
    higher_is_better: bool = True
    format: str = "{:.2f}"
    error_of: str | None = None  # the key of the metric this one is the error bar (± std error) of

    def fmt(self, value: float | None) -> str:
        return "—" if value is None else self.format.format(value)

    @property
    def is_error_bar(self) -> bool:
        """An uncertainty, not a figure of merit: it never has a winner."""
        return self.error_of is not None or self.label.startswith("±")

    @property
    def heading(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def to_dict(self) -> dict[str, Any]:
        d = {"key": self.key, "label": self.label, "unit": self.unit, "higher_is_better": self.higher_is_better}
        return {**d, "error_of": self.error_of} if self.error_of else d


@dataclass(frozen=True)
class Comparison:
    """The verdict on one metric across the rows that carry a value and no error, the reference and any
    baseline excepted (they are yardsticks, not candidates); an error-bar metric has no verdict.

    `winners`: every model whose value equals the best one (more than one = a tie); empty when fewer
    than two candidates have a value. `runner_up`: the best model strictly behind the winners (None when there is none).
    `change_pct`: the winners' value relative to the runner-up's, 100·(w − r)/|r|, signed as measured:
    positive for a faster tok/s, negative for a smaller time or memory — in both cases the winner's
    advantage. `changes_pct` (only with a reference): every model's 100·(v − ref)/|ref|."""

    metric: Metric
    winners: tuple[str, ...]
    value: float | None
    runner_up: str | None
    runner_up_value: float | None
    change_pct: float | None
    reference: str | None = None
    changes_pct: Mapping[str, float] = field(default_factory=dict)

    @property
    def winner_text(self) -> str:
        return " = ".join(self.winners) if self.winners else "—"

    @property
    def change_text(self) -> str:
        return "—" if self.change_pct is None else f"{self.change_pct:+.1f} %"

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric.key,
            "label": self.metric.label,
            "unit": self.metric.unit,
            "higher_is_better": self.metric.higher_is_better,
            "winners": list(self.winners),
            "value": self.value,
            "runner_up": self.runner_up,
            "runner_up_value": self.runner_up_value,
            "change_pct": self.change_pct,
            "reference": self.reference,
            "changes_pct": dict(self.changes_pct),
        }


def _percent(value: float, base: float) -> float | None:
    return None if base == 0 else 100.0 * (value - base) / abs(base)


def _valid(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[str, float]]:
    out = []
    for row in rows:
        value = row.get(key)
        if not row.get("error") and isinstance(value, (int, float)) and math.isfinite(value):
            out.append((str(row["model"]), float(value)))
    return out


def compare_metric(
    rows: Sequence[Mapping[str, Any]],
    metric: Metric,
    reference: str | None = None,
    *,
    exclude: Collection[str] = (),
) -> Comparison:
    """The `Comparison` of one metric (see its docstring). Rows with an `error`, the `reference` and the
    models in `exclude` (a baseline) never win; an error-bar metric has no winner at all."""
    values = _valid(rows, metric.key)
    candidates = [] if metric.is_error_bar else [(m, v) for m, v in values if m != reference and m not in exclude]
    sign = 1.0 if metric.higher_is_better else -1.0
    ordered = sorted(candidates, key=lambda mv: -sign * mv[1])  # best first; stable: row order breaks nothing
    if len(ordered) < 2:  # nothing to beat: a lone candidate is compared with the reference, if anything
        return Comparison(metric, (), None, None, None, None, reference, _changes(values, reference, metric))
    best = ordered[0][1]
    tied = [m for m, v in ordered if math.isclose(v, best, rel_tol=TIE_REL_TOL)]
    rest = [(m, v) for m, v in ordered if m not in tied]
    runner, runner_value = rest[0] if rest else (None, None)
    change = None if runner_value is None else _percent(best, runner_value)
    changes = _changes(values, reference, metric)
    return Comparison(metric, tuple(tied), best, runner, runner_value, change, reference, changes)


def _changes(values: list[tuple[str, float]], reference: str | None, metric: Metric) -> dict[str, float]:
    ref_value = dict(values).get(reference) if reference is not None else None
    if ref_value is None or metric.is_error_bar:
        return {}
    return {m: p for m, v in values if (p := _percent(v, ref_value)) is not None}


def comparison(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[Metric],
    reference: str | None = None,
    *,
    exclude: Collection[str] = (),
) -> list[Comparison]:
    """One `Comparison` per metric, in the metrics' order."""
    return [compare_metric(rows, m, reference, exclude=exclude) for m in metrics]


def error_bar_of(metrics: Sequence[Metric], metric: Metric) -> Metric | None:
    """The metric holding `metric`'s error bar: one whose `error_of` names it, or, by convention, a
    "±"-labelled metric right after it."""
    for i, m in enumerate(metrics):
        if m.error_of == metric.key or (
            m.error_of is None and m.label.startswith("±") and i > 0 and metrics[i - 1].key == metric.key
        ):
            return m
    return None


@dataclass(frozen=True)
class Series:
    """Lines for one plot: `lines[model]` = ((x, y), …) in increasing x."""

    name: str
    x_label: str
    y_label: str
    lines: Mapping[str, tuple[tuple[float, float], ...]]

    def to_dict(self) -> dict[str, Any]:
        lines = {m: [list(p) for p in pts] for m, pts in self.lines.items()}
        return {"name": self.name, "x_label": self.x_label, "y_label": self.y_label, "lines": lines}


@dataclass(frozen=True)
class Report:
    """Everything one run measured. `kind` names the command ("bench", "ppl"); `settings` its parameters
    (JSON-able); `rows` one dict per model (module docstring); `reference` a model name for relative
    changes (None = compare with the runner-up only); `baseline` the model the others were measured
    against, e.g. the KL reference (None = the row of `settings["kl_reference"]`, if any). Neither wins."""

    kind: str
    title: str
    system: Mapping[str, Any]
    settings: Mapping[str, Any]
    metrics: tuple[Metric, ...]
    rows: tuple[Mapping[str, Any], ...]
    reference: str | None = None
    series: tuple[Series, ...] = ()
    baseline: str | None = None

    @property
    def yardsticks(self) -> tuple[str, ...]:
        """The models that are measured against rather than compared: the reference and the baseline
        (given, or the row whose path or name is `settings["kl_reference"]`)."""
        names = [self.reference, self.baseline or self._kl_reference_row()]
        return tuple(dict.fromkeys(n for n in names if n is not None))

    def _kl_reference_row(self) -> str | None:
        target = self.settings.get("kl_reference")
        if not target:
            return None
        for row in self.rows:
            if target in (row.get("path"), row.get("model")) or _same_path(str(target), row.get("path")):
                return str(row["model"])
        return None

    def comparison(self) -> list[Comparison]:
        return comparison(self.rows, self.metrics, self.reference, exclude=self.yardsticks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kind": self.kind,
            "title": self.title,
            "system": dict(self.system),
            "settings": dict(self.settings),
            "reference": self.reference,
            "baseline": self.baseline,
            "metrics": [m.to_dict() for m in self.metrics],
            "rows": [dict(r) for r in self.rows],
            "comparison": [c.to_dict() for c in self.comparison()],
            "series": [s.to_dict() for s in self.series],
        }


# ---- system ---------------------------------------------------------------------------------------------
def system_info(device: str | None = None) -> dict[str, Any]:
    """Where the numbers were measured. Never raises: what cannot be found is None.

    Keys: date (ISO 8601, UTC), cpu, cores, ram_gb (1e9 bytes), gpu (None, or name, memory_gb,
    capability, driver, cuda), device (the one measured on), python, platform, torch, triton, ossq."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "gpu": _gpu_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "ossq": _version("ossq") or __version__,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)  # no import: triton takes seconds to import
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu_info() -> dict[str, Any] | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {
            "name": props.name,
            "memory_gb": round(props.total_memory / 1e9, 1),
            "capability": f"{props.major}.{props.minor}",
            "driver": _nvidia_driver(),
            "cuda": torch.version.cuda,
        }
    except Exception:  # a broken CUDA setup must not stop a report
        return None


def _nvidia_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def system_line(system: Mapping[str, Any]) -> str:
    """One line for titles: GPU (or CPU), torch version, date."""
    gpu = system.get("gpu")
    where = f"{gpu['name']} ({gpu['memory_gb']} GB)" if gpu else f"{system.get('cpu')} ({system.get('cores')} cores)"
    return f"{where}, torch {system.get('torch')}, ossq {system.get('ossq')}, {system.get('date')}"


# ---- cells: what every renderer shows for one (metric, model) -------------------------------------------
def _same_path(a: str, b: Any) -> bool:
    if not isinstance(b, str):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _range(row: Mapping[str, Any], key: str) -> tuple[float, float] | None:
    """(min, max) of the repeats behind `row[key]`, when the row keeps them (`row["range"][key]`)."""
    spread = row.get("range")
    pair = spread.get(key) if isinstance(spread, Mapping) else None
    if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair):
        return float(pair[0]), float(pair[1])
    return None


def _range_text(metric: Metric, row: Mapping[str, Any]) -> str | None:
    spread = _range(row, metric.key)
    return None if spread is None else f"{metric.fmt(spread[0])}–{metric.fmt(spread[1])}"


def highlighted(c: Comparison, model: str) -> bool:
    """Whether `model`'s cell of `c` is marked as the best: the table's bold and the plot's colour."""
    return model in c.winners


def _note(c: Comparison, row: Mapping[str, Any], yardsticks: Collection[str]) -> str | None:
    """ "ref" for a yardstick's value, else its change vs the reference, e.g. "+4.1 %"; None for neither."""
    model = str(row["model"])
    if row.get(c.metric.key) is None or c.metric.is_error_bar:
        return None
    if model in yardsticks:
        return "ref"
    change = c.changes_pct.get(model)
    return None if change is None else f"{change:+.1f} %"


def _value_text(c: Comparison, row: Mapping[str, Any], yardsticks: Collection[str]) -> str:
    """The value, then in parentheses its change vs the reference or "ref" (one line: Markdown)."""
    note = _note(c, row, yardsticks)
    text = c.metric.fmt(row.get(c.metric.key))
    return text if note is None else f"{text} ({note})"


# ---- terminal -------------------------------------------------------------------------------------------
def _model_cell(c: Comparison, row: Mapping[str, Any], yardsticks: Collection[str] = ()) -> str:
    """Lines of one cell: the value (bold green for a winner), then its change or "ref", then the min–max
    of the repeats; each line is one unbreakable number (`tables` sizes the columns to fit them)."""
    text = _escape(c.metric.fmt(row.get(c.metric.key)))
    if highlighted(c, str(row["model"])):
        text = f"[bold green]{text}[/bold green]"
    lines = [text]
    note = _note(c, row, yardsticks)
    if note is not None:
        lines.append(f"({note})" if note != "ref" else "[blue](ref)[/blue]")
    spread = _range_text(c.metric, row)
    if spread is not None:
        lines.append(f"[dim]{spread}[/dim]")
    return "\n".join(lines)


def _plain_width(cells: Sequence[str]) -> int:
    from rich.text import Text

    return max((len(line) for cell in cells for line in Text.from_markup(cell).plain.split("\n")), default=1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def tables(report: Report) -> list[Table]:
    """rich Tables: one row per metric with a column per model, the winner and its margin over the
    runner-up (models side by side stay readable in 80 columns for up to ~4 models, however many
    metrics); then the models that failed, and one table per series (models × x). Numbers never wrap:
    a value and its min–max range are separate lines of a cell."""
    from rich.table import Table

    ok = [r for r in report.rows if not r.get("error")]
    yardsticks = report.yardsticks
    comparisons = report.comparison()
    cells = [[_model_cell(c, r, yardsticks) for c in comparisons] for r in ok]  # per model column
    margins = ["" if c.metric.is_error_bar else c.change_text for c in comparisons]
    table = Table(title=f"{report.title} — {system_line(report.system)}")
    table.add_column("metric", min_width=8)
    for row, column in zip(ok, cells, strict=True):  # a narrow terminal folds the header, never a number
        table.add_column(str(row["model"]), justify="right", min_width=_plain_width(column), overflow="fold")
    table.add_column("winner", min_width=6, overflow="fold")
    table.add_column("vs runner-up", justify="right", min_width=_plain_width(margins))
    for i, c in enumerate(comparisons):
        winner = "" if c.metric.is_error_bar else c.winner_text
        table.add_row(c.metric.heading, *(column[i] for column in cells), winner, margins[i])
    if yardsticks:
        table.caption = f"ref: {', '.join(yardsticks)} (measured against, never a winner)"
    out = [table]
    failed = [r for r in report.rows if r.get("error")]
    if failed:
        errors = Table(title="failed")
        errors.add_column("model")
        errors.add_column("error", style="red")
        for row in failed:
            errors.add_row(str(row["model"]), _escape(str(row["error"])))
        out.append(errors)
    out.extend(_series_table(s) for s in report.series)
    return out


def _changes_text(c: Comparison) -> str:
    return ", ".join(f"{m} {p:+.1f} %" for m, p in c.changes_pct.items() if m != c.reference) or "—"


def _series_table(series: Series) -> Table:
    from rich.table import Table

    xs = sorted({x for pts in series.lines.values() for x, _ in pts})
    table = Table(title=f"{series.y_label} vs {series.x_label}")
    table.add_column("model")
    for x in xs:
        table.add_column(_num(x), justify="right", no_wrap=True)
    for model, pts in series.lines.items():
        ys = dict(pts)
        table.add_row(model, *(f"{ys[x]:.1f}" if x in ys else "—" for x in xs))
    return table


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def print_report(report: Report, console: Console | None = None) -> None:
    from rich.console import Console

    console = console or Console()
    for table in tables(report):
        console.print(table)


# ---- JSON and Markdown ----------------------------------------------------------------------------------
def to_json(report: Report, path: str | Path) -> Path:
    """Write `report.to_dict()` (schema in the module docstring) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return path


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_md_row(header), _md_row(["---"] * len(header)), *(_md_row(r) for r in rows)]


def setting_text(value: Any) -> str:
    """A setting as a reader writes it: lists joined with commas, nothing as "—", yes/no, no Python reprs."""
    if value is None or value == [] or value == () or value == {}:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(setting_text(v) for v in value)
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {setting_text(v)}" for k, v in value.items())
    return str(value)


def _md_system(report: Report) -> list[str]:
    s = report.system
    gpu = s.get("gpu")
    lines = [f"- **Device**: {s.get('device') or report.settings.get('device') or '—'}"]
    if gpu:
        lines.append(
            f"- **GPU**: {gpu['name']}, {gpu['memory_gb']} GB, driver {gpu.get('driver') or '—'}, "
            f"CUDA {gpu.get('cuda') or '—'}"
        )
    lines += [
        f"- **CPU**: {s.get('cpu') or '—'} ({s.get('cores')} cores), RAM {s.get('ram_gb')} GB",
        f"- **Software**: ossq {s.get('ossq')}, torch {s.get('torch')}, triton {s.get('triton') or '—'}, "
        f"Python {s.get('python')}",
        f"- **Date**: {s.get('date')}",
    ]
    settings = {k: v for k, v in report.settings.items() if k != "device"}  # the device is listed above
    if settings:
        lines += ["", "### Settings", ""]
        lines += [f"- **{k.replace('_', ' ')}**: {setting_text(v)}" for k, v in settings.items()]
    return lines


def _md_comparison(report: Report) -> list[str]:
    header = ["metric", "winner", "value", "vs runner-up", "runner-up"]
    if report.reference:
        header.append(f"vs {report.reference}")
    rows = []
    for c in report.comparison():
        if c.metric.is_error_bar:
            continue
        cells = [c.metric.heading, c.winner_text, c.metric.fmt(c.value), c.change_text, c.runner_up or "—"]
        if report.reference:
            cells.append(_changes_text(c))
        rows.append(cells)
    return _md_table(header, rows)


def _md_model_cells(report: Report, row: Mapping[str, Any], comparisons: Sequence[Comparison]) -> list[str]:
    if row.get("error"):
        return [str(row["model"]), f"error: {row['error']}", *[""] * (len(report.metrics) - 1)]
    cells = [str(row["model"])]
    for c in comparisons:
        text = _value_text(c, row, report.yardsticks)
        if highlighted(c, str(row["model"])):
            text = f"**{text}**"
        spread = _range_text(c.metric, row)
        cells.append(text if spread is None else f"{text} ({spread})")
    return cells


def _md_series(series: Series) -> list[str]:
    xs = sorted({x for pts in series.lines.values() for x, _ in pts})
    rows = []
    for model, pts in series.lines.items():
        ys = dict(pts)
        rows.append([model, *(f"{ys[x]:.1f}" if x in ys else "—" for x in xs)])
    return [f"### {series.y_label} vs {series.x_label}", "", *_md_table(["model", *map(_num, xs)], rows), ""]


def markdown(report: Report) -> str:
    """The report as Markdown a user can paste into a model card: the machine, the settings, a table of
    every model (best values in bold, min–max of the repeats in parentheses), the winners, the series."""
    comparisons = report.comparison()
    per_model = [_md_model_cells(report, r, comparisons) for r in report.rows]
    lines = [f"## {report.title}", "", "### System", "", *_md_system(report), "", "### Results", ""]
    lines += _md_table(["model", *(m.heading for m in report.metrics)], per_model)
    if report.yardsticks:
        lines += ["", f"ref: {', '.join(report.yardsticks)} (measured against, never a winner)"]
    lines += ["", "### Comparison", "", *_md_comparison(report), ""]
    for s in report.series:
        lines += _md_series(s)
    return "\n".join(lines)


def to_markdown(report: Report, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(report))
    return path


# ---- plots ----------------------------------------------------------------------------------------------
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".eps", ".ps", ".tif", ".tiff")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed); OssqError naming the `plot`
    extra when matplotlib is not installed."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise OssqError("plots need matplotlib: pip install 'ossq[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_bars(report: Report, metrics: Sequence[Metric] | None = None, path: str | Path = "report.png") -> Path:
    """One bar subplot per metric (default: all the report's but error bars), one bar per model without
    an error. The bars the table marks best are green (`highlighted`), a yardstick's are blue and
    labelled "(ref)", the others grey; whiskers show the min–max of the repeats, or ± the metric's error
    bar (`error_bar_of`). Written as PNG (or whatever `path`'s suffix names, see PLOT_SUFFIXES)."""
    plt = pyplot()
    metrics = list(metrics or [m for m in report.metrics if not m.is_error_bar])
    cols = min(3, len(metrics)) or 1
    nrows = math.ceil(len(metrics) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    by_metric = {c.metric.key: c for c in report.comparison()}
    for ax, metric in zip(axes.flat, metrics, strict=False):
        c = by_metric.get(metric.key) or compare_metric(
            report.rows, metric, report.reference, exclude=report.yardsticks
        )
        _bar_panel(ax, report, c)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(f"{report.title}\n{system_line(report.system)}", fontsize=9)
    return _save(fig, plt, path)


def _bar_panel(ax, report: Report, c: Comparison) -> None:
    rows = {str(r["model"]): r for r in report.rows if not r.get("error")}
    values = _valid(report.rows, c.metric.key)
    yardsticks = report.yardsticks
    colors = ["tab:green" if highlighted(c, m) else "tab:blue" if m in yardsticks else "tab:gray" for m, _ in values]
    labels = [f"{m} (ref)" if m in yardsticks else m for m, _ in values]
    low, high = _whiskers(report, c.metric, [(rows[m], v) for m, v in values])
    yerr = [low, high] if any(low) or any(high) else None
    ax.bar(labels, [v for _, v in values], color=colors, yerr=yerr, capsize=3, ecolor="black")
    ax.set_title(c.metric.heading + ("" if c.metric.higher_is_better else " (lower is better)"), fontsize=9)
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)


def _whiskers(report: Report, metric: Metric, rows: list[tuple[Mapping[str, Any], float]]):
    """Distances below and above each bar: to the repeats' min and max, else ± the error bar."""
    error = error_bar_of(report.metrics, metric)
    low, high = [], []
    for row, value in rows:
        spread = _range(row, metric.key)
        e = row.get(error.key) if error is not None else None
        if spread is not None:
            low.append(max(value - spread[0], 0.0))
            high.append(max(spread[1] - value, 0.0))
        elif isinstance(e, (int, float)) and math.isfinite(e):
            low.append(abs(e))
            high.append(abs(e))
        else:
            low.append(0.0)
            high.append(0.0)
    return low, high


def plot_lines(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    x_label: str,
    y_label: str,
    *,
    title: str | None = None,
    log_x: bool = True,
) -> Path:
    """One line per model of (x, y) points, e.g. decode tok/s vs context length (log x axis by default,
    as context lengths grow geometrically)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for model, pts in series.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=model)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def model_names(models: Sequence[str]) -> list[str]:
    """Short unique display names: the directory name, or the whole argument when two would clash."""
    short = [Path(m).name or m for m in models]
    names = [s if short.count(s) == 1 else m for s, m in zip(short, models, strict=True)]
    return [n if names.count(n) == 1 else f"{n}#{names[: i + 1].count(n)}" for i, n in enumerate(names)]


def write_files(
    report: Report,
    *,
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    plot_metrics: Sequence[Metric] | None = None,
) -> list[Path]:
    """The files asked for: JSON, Markdown, and bars of `plot_metrics` (default all) at `plot_path`, plus
    `<stem>-<series name><suffix>` per series (e.g. decode tok/s against context length)."""
    written = []
    if json_path:
        written.append(to_json(report, json_path))
    if markdown_path:
        written.append(to_markdown(report, markdown_path))
    if plot_path:
        plot_path = Path(plot_path)
        written.append(plot_bars(report, list(plot_metrics or report.metrics), plot_path))
        for s in report.series:
            path = plot_path.with_name(f"{plot_path.stem}-{s.name}{plot_path.suffix}")
            written.append(plot_lines(s.lines, path, s.x_label, s.y_label, title=f"{s.y_label} vs context"))
    return written
