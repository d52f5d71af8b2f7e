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


def test_a_lone_model_has_nothing_to_beat_a_unanimous_winner_no_margin_and_no_values_no_winner():
    (lone,) = comparison([{"model": "a", "tps": 3.0}], [TPS])
    assert (lone.winners, lone.runner_up, lone.change_pct) == ((), None, None)
    (alone,) = comparison([{"model": "ref", "tps": 9.0}, {"model": "a", "tps": 3.0}], [TPS], reference="ref")
    assert alone.winners == () and alone.changes_pct["a"] == pytest.approx(-100 * 6 / 9)
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
        "baseline",
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


# ---- yardsticks, error bars, ranges: what is compared and how it is shown --------------------------------
KL = Metric("kl_mean", "mean KL", "nats", higher_is_better=False, format="{:.5f}")
PPL = Metric("perplexity", "perplexity", higher_is_better=False, format="{:.3f}")
STD = Metric("std_error", "± std error", higher_is_better=False, format="{:.3f}")
PPL_ROWS = (
    {"model": "bf16", "path": "/m/bf16", "perplexity": 10.0, "std_error": 0.1, "kl_mean": 0.0},
    {"model": "q4", "path": "/m/q4", "perplexity": 10.5, "std_error": 0.2, "kl_mean": 0.03},
    {"model": "q8", "path": "/m/q8", "perplexity": 10.1, "std_error": 0.3, "kl_mean": 0.005},
)


def ppl_report(**kwargs) -> Report:
    settings = {"data": "wiki.txt", "context": [], "doc_separator": None, "eos_between_docs": True,
                "kl_reference": "/m/bf16", "device": "cpu"}  # fmt: skip
    return Report("ppl", "perplexity", system_info("cpu"), settings, (PPL, STD, KL), PPL_ROWS, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"reference": "bf16"}, {"baseline": "bf16"}])
def test_the_kl_reference_never_wins_even_its_zero_kl_against_itself(kwargs):
    report = ppl_report(**kwargs)
    assert report.yardsticks == ("bf16",)
    ppl, std, kl = report.comparison()
    assert (kl.winners, kl.runner_up) == (("q8",), "q4")  # not bf16's −100 %
    assert ppl.winners == ("q8",)


def test_an_error_bar_has_no_winner_anywhere():
    report = ppl_report()
    std = report.comparison()[1]
    assert STD.is_error_bar and std.winners == () and std.change_pct is None
    console = Console(record=True, width=160)
    print_report(report, console)
    line = next(line for line in console.export_text().splitlines() if "± std error" in line)
    assert [c.strip() for c in line.split("│")[1:-1]][-2:] == ["", ""]  # no winner, no margin
    assert "| ± std error |" not in markdown(report).split("### Comparison")[1]


def test_markdown_writes_settings_as_text_and_the_device_once():
    text = markdown(ppl_report())
    assert "- **context**: —" in text and "- **doc separator**: —" in text and "- **eos between docs**: yes" in text
    assert "[]" not in text and "None" not in text and "True" not in text
    assert "- **Device**: cpu" in text and "**device**" not in text  # not again under the settings


def test_min_and_max_of_the_repeats_are_shown_in_the_table_and_the_markdown():
    rows = ({"model": "a", "tps": 123.4, "range": {"tps": [120.1, 125.0]}}, {"model": "b", "tps": 99.4})
    report = Report("bench", "ossq bench", system_info("cpu"), {}, (TPS,), rows)
    console = Console(record=True, width=100)
    print_report(report, console)
    assert "120.1–125.0" in console.export_text()
    assert "| a | **123.4** (120.1–125.0) |" in markdown(report)


def test_the_plot_colours_what_the_table_bolds_and_draws_the_range_as_whiskers(monkeypatch):
    from ossq import report as report_mod

    drawn = []

    class Axes:
        def bar(self, labels, heights, color, yerr, **_):
            drawn.append((labels, color, yerr))

        def set_title(self, *_, **__):
            pass

        def tick_params(self, **_):
            pass

    rows = (*PPL_ROWS, {"model": "q3", "perplexity": 11.0, "range": {"perplexity": [10.0, 12.5]}})
    report = Report("ppl", "perplexity", system_info("cpu"), {"kl_reference": "/m/bf16"}, (PPL, STD, KL), rows)
    for c in report.comparison():
        if not c.metric.is_error_bar:
            report_mod._bar_panel(Axes(), report, c)
    (labels, colors, yerr), (kl_labels, kl_colors, _) = drawn
    assert labels == ["bf16 (ref)", "q4", "q8", "q3"]
    assert colors == ["tab:blue", "tab:gray", "tab:green", "tab:gray"]  # q8 is bold in the table too
    assert yerr[0] == pytest.approx([0.1, 0.2, 0.3, 1.0]) and yerr[1] == pytest.approx([0.1, 0.2, 0.3, 1.5])
    assert kl_colors[kl_labels.index("q8")] == "tab:green"  # the KL panel is coloured like its table row


def test_perplexity_cells_never_wrap_mid_number_on_an_80_column_terminal():
    names = ("gpt-oss-20b-bf16", "gpt-oss-20b-4bit", "gpt-oss-20b-8bit")
    rows = tuple({**r, "model": n, "path": f"/m/{n}"} for r, n in zip(PPL_ROWS, names, strict=True))
    rows[0]["perplexity"] = 12345.678
    report = Report("ppl", "perplexity", system_info("cpu"), {"kl_reference": "/m/gpt-oss-20b-bf16"}, (PPL, STD, KL),
                    rows, reference="gpt-oss-20b-bf16")  # fmt: skip
    console = Console(record=True, width=80)
    print_report(report, console)
    text = console.export_text()
    for r in rows:
        for m in (PPL, STD, KL):
            assert m.fmt(r[m.key]) in text, (r["model"], m.key)
    assert "(-99.9 %)" in text and "(ref)" in text
