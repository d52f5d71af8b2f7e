"""The shared report: winners and margins on constructed rows, the JSON schema, Markdown and plots."""

from __future__ import annotations

import datetime
import json
import sys

import pytest
from rich.console import Console

from ossq.errors import OssqError
from ossq.report import (
    SCHEMA,
    Metric,
    Report,
    Series,
    comparison,
    markdown,
    plot_bars,
    plot_lines,
    print_report,
    system_info,
    to_json,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TPS = Metric("tps", "generation", "tok/s", higher_is_better=True, format="{:.1f}")
MEM = Metric("mem", "peak memory", "GB", higher_is_better=False, format="{:.2f}")
ROWS = (
    {"model": "a", "tps": 100.0, "mem": 12.0},
    {"model": "b", "tps": 125.0, "mem": 10.0},
    {"model": "c", "tps": 80.0, "mem": 15.0},
    {"model": "broken", "error": "CheckpointError: no such directory", "tps": 1e9, "mem": 0.001},
)


def make_report(**kwargs) -> Report:
    series = (Series("decode_vs_context", "context", "tok/s", {"a": ((1024.0, 90.0), (4096.0, 70.0))}),)
    defaults = dict(system=system_info("cpu"), settings={"repeats": 2}, metrics=(TPS, MEM), rows=ROWS, series=series)
    return Report("bench", "ossq bench", **{**defaults, **kwargs})


def test_the_winner_follows_each_metrics_direction_and_beats_the_runner_up_by_the_stated_percent():
    tps, mem = comparison(ROWS, [TPS, MEM])
    assert (tps.winners, tps.runner_up, tps.value) == (("b",), "a", 125.0)
    assert tps.change_pct == pytest.approx(25.0)  # 125 vs 100
    assert (mem.winners, mem.runner_up, mem.value) == (("b",), "a", 10.0)
    assert mem.change_pct == pytest.approx(-100 / 6)  # 10 GB vs 12 GB: 16.7 % less
    assert mem.change_text == "-16.7 %"


def test_a_row_with_an_error_never_wins_even_with_the_best_numbers():
    winners = {c.metric.key: c.winners for c in comparison(ROWS, [TPS, MEM])}
    assert all("broken" not in w for w in winners.values())


def test_equal_values_share_the_win_and_the_margin_is_over_the_next_distinct_value():
    rows = [{"model": "a", "tps": 100.0}, {"model": "b", "tps": 100.0}, {"model": "c", "tps": 50.0}]
    (c,) = comparison(rows, [TPS])
    assert c.winners == ("a", "b")
    assert c.winner_text == "a = b"
    assert (c.runner_up, c.change_pct) == ("c", pytest.approx(100.0))


def test_a_lone_or_unanimous_winner_has_no_margin_and_no_values_no_winner():
    (lone,) = comparison([{"model": "a", "tps": 3.0}], [TPS])
    assert (lone.winners, lone.runner_up, lone.change_pct) == (("a",), None, None)
    (tie,) = comparison([{"model": "a", "tps": 3.0}, {"model": "b", "tps": 3.0}], [TPS])
    assert (tie.winners, tie.change_pct) == (("a", "b"), None)
    (empty,) = comparison([{"model": "a", "tps": None}, {"model": "b", "error": "x"}], [TPS])
    assert (empty.winners, empty.value, empty.winner_text) == ((), None, "—")


def test_changes_against_a_reference_are_relative_to_the_reference_row():
    (c,) = comparison(ROWS, [MEM], reference="a")
    assert c.changes_pct == pytest.approx({"a": 0.0, "b": -100 / 6, "c": 25.0})
    assert c.winners == ("b",)


def test_json_has_the_stable_schema(tmp_path):
    path = to_json(make_report(reference="a"), tmp_path / "r.json")
    d = json.loads(path.read_text())
    assert d["schema"] == SCHEMA
    assert set(d) == {
        "schema",
        "kind",
        "title",
        "system",
        "settings",
        "reference",
        "metrics",
        "rows",
        "comparison",
        "series",
    }
    assert d["metrics"][0] == {"key": "tps", "label": "generation", "unit": "tok/s", "higher_is_better": True}
    assert [r["model"] for r in d["rows"]] == ["a", "b", "c", "broken"]
    assert set(d["comparison"][0]) == {
        "metric",
        "label",
        "unit",
        "higher_is_better",
        "winners",
        "value",
        "runner_up",
        "runner_up_value",
        "change_pct",
        "reference",
        "changes_pct",
    }
    assert d["comparison"][0]["winners"] == ["b"]
    assert d["series"][0]["lines"]["a"] == [[1024.0, 90.0], [4096.0, 70.0]]


def test_system_info_names_the_machine_and_a_utc_iso_date():
    info = system_info("cpu")
    assert {"date", "device", "cpu", "cores", "ram_gb", "gpu", "python", "torch", "triton", "ossq"} <= set(info)
    assert datetime.datetime.fromisoformat(info["date"]).utcoffset() == datetime.timedelta(0)
    assert info["cores"] >= 1 and info["torch"] and info["ossq"]
    json.dumps(info)  # must be JSON-able as is


def test_markdown_has_system_results_and_a_comparison_with_winner_and_percent():
    text = markdown(make_report())
    for heading in ("### System", "### Results", "### Comparison", "### tok/s vs context"):
        assert heading in text
    assert "| generation (tok/s) | b | 125.0 | +25.0 % | a |" in text
    assert "| peak memory (GB) | b | 10.00 | -16.7 % | a |" in text
    assert "| broken | error: CheckpointError: no such directory |" in text
    assert "| a | 90.0 | 70.0 |" in text


def test_terminal_table_puts_models_side_by_side_with_the_winner_and_lists_failures():
    console = Console(record=True, width=160)
    print_report(make_report(), console)
    text = console.export_text()
    gen_line = next(line for line in text.splitlines() if "generation (tok/s)" in line)
    cells = [c.strip() for c in gen_line.strip("│ ").split("│")]
    assert cells == ["generation (tok/s)", "100.0", "125.0", "80.0", "b", "+25.0 %"]
    assert "CheckpointError: no such directory" in text


def test_bar_and_line_plots_are_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    bars = plot_bars(make_report(), None, tmp_path / "bars.png")
    lines = plot_lines({"a": [(1024, 90.0), (4096, 70.0)]}, tmp_path / "lines.png", "context", "tok/s")
    for path in (bars, lines):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_plotting_without_matplotlib_names_the_plot_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(OssqError, match=r"ossq\[plot\]"):
        plot_bars(make_report(), None, tmp_path / "bars.png")
    assert not (tmp_path / "bars.png").exists()
