"""Recipes decide each module's storage as mlx-lm does, and the size report equals mlx-lm's figures.

Oracles: the numbers derived in the shared spec (formats.md §3.4, §3.7, §5) for the real model sizes, and
mlx-lm itself (its `quantize_model`, `mixed_quant_predicate_builder`, `get_total_parameters`,
`compute_bits_per_weight`) on small gpt_oss models built without weights.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest

from ossq.config import PRESETS, ModelConfig
from ossq.errors import OssqError, UnsupportedQuantization
from ossq.formats.mlx import linear_modules
from ossq.quant.recipe import (
    BUILTIN,
    Recipe,
    experts_mxfp4,
    from_file,
    mixed,
    mixed_more_bits,
    plan,
    render_table,
    resolve,
    tiered,
    uniform,
)
from ossq.quant.spec import QuantSpec

C20, C120 = PRESETS["20b"], PRESETS["120b"]


def specs_of_kind(p, kind):
    return {m.layer: p.specs[m.path] for m in linear_modules(p.config) if m.kind == kind}


# ---- the spec's derived figures for the real models ------------------------------------------------------
def test_unquantized_20b_counts_mlx_lm_total_parameters_without_sinks():
    assert plan(Recipe("bf16", QuantSpec(), ()), C20).total_parameters == 20_914_755_648


@pytest.mark.parametrize(
    ("config", "recipe", "bpw", "gb"),
    [
        (C20, uniform(4, 64), "4.504", 11.78),
        (C120, uniform(4, 64), "4.504", 65.78),
        (C20, uniform(8, 64), "8.503", 22.23),
        (C120, uniform(8, 64), "8.503", 124.17),
        (C20, experts_mxfp4(4, 64), "4.276", 11.18),
        (C120, experts_mxfp4(4, 64), "4.259", 62.20),
    ],
    ids=["20b-4bit", "120b-4bit", "20b-8bit", "120b-8bit", "20b-mxfp4", "120b-mxfp4"],
)
def test_uniform_and_direct_flavour_sizes_match_the_spec(config, recipe, bpw, gb):
    p = plan(recipe, config, source_experts_mxfp4=True)
    assert f"{p.bits_per_weight:.3f}" == bpw
    assert round(p.total_bytes / 1e9, 2) == gb
    assert p.skipped == ()


@pytest.mark.parametrize(
    ("name", "bpw20", "gb20", "bpw120", "gb120"),
    [
        ("mixed_2_6", "3.228", 8.44, "3.180", 46.4),
        ("mixed_3_4", "3.685", 9.63, "3.673", 53.6),
        ("mixed_3_6", "4.047", 10.58, "4.011", 58.6),
        ("mixed_4_6", "4.865", 12.72, "4.841", 70.7),
    ],
)
def test_mixed_recipe_sizes_match_the_spec(name, bpw20, gb20, bpw120, gb120):
    # formats.md §3.7 prints these to 2 decimals (3.69 for mixed_3_4's 3.685; the exact value is 3.68499).
    p20, p120 = plan(mixed(name), C20), plan(mixed(name), C120)
    assert f"{p20.bits_per_weight:.3f}" == bpw20 and round(p20.total_bytes / 1e9, 2) == gb20
    assert f"{p120.bits_per_weight:.3f}" == bpw120 and round(p120.total_bytes / 1e9, 1) == gb120


def test_tiered_recipe_gives_the_120b_cards_3_56_bits_and_48_gib():
    p = plan(tiered(), C120)
    assert f"{p.bits_per_weight:.3f}" == "3.557"
    # The card's "48 GB" is binary: 51.95e9 bytes = 48.4 GiB.
    assert round(p.total_bytes / 2**30, 1) == 48.4
    p20 = plan(tiered(), C20)
    assert f"{p20.bits_per_weight:.3f}" == "3.753" and round(p20.total_bytes / 1e9, 2) == 9.81


def test_tiered_recipe_puts_6_bits_on_edge_and_full_attention_q_and_4_on_middle_sliding():
    p = plan(tiered(), C120)
    q = {layer: s.bits for layer, s in specs_of_kind(p, "q_proj").items()}
    four = {i for i in range(6, 30) if i % 2 == 0}
    assert {i for i, b in q.items() if b == 4} == four and set(q.values()) == {4, 6}
    assert all(s is None for s in specs_of_kind(p, "router").values())
    assert {s.bits for s in specs_of_kind(p, "down_proj").values()} == {3}
    assert p.specs["model.embed_tokens"].bits == 6 and p.specs["lm_head"].bits == 6


@pytest.mark.parametrize(
    ("config", "high"),
    [
        (C20, {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23}),
        (C120, {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35}),
    ],
    ids=["L24", "L36"],
)
def test_mixed_recipe_raises_v_and_down_proj_in_the_spec_layer_set(config, high):
    p = plan(mixed("mixed_3_6"), config)
    for kind in ("v_proj", "down_proj"):
        assert {i for i, s in specs_of_kind(p, kind).items() if s.bits == 6} == high
    assert {s.bits for s in specs_of_kind(p, "router").values()} == {3}
    assert (p.specs["model.embed_tokens"].bits, p.specs["lm_head"].bits) == (3, 6)
    assert {i for i in range(config.num_hidden_layers) if mixed_more_bits(i, config)} == high


def test_mixed_recipe_without_group_size_asks_for_null_group_in_config():
    assert mixed("mixed_3_6").group_size_null and plan(mixed("mixed_3_6"), C20).group_size_null
    assert not mixed("mixed_3_6", 32).group_size_null
    assert mixed("mixed_3_6").top == QuantSpec(4, 64, "affine")


def test_group_128_quantizes_only_o_proj_and_reports_the_rest_skipped():
    p = plan(uniform(4, 128), C20)
    quantized = {path for path, s in p.specs.items() if s is not None}
    assert quantized == {m.path for m in linear_modules(C20) if m.kind == "o_proj"}
    assert set(p.skipped) == set(p.specs) - quantized
    assert all(p.specs[path] == QuantSpec(4, 128) for path in quantized)


def test_direct_flavour_keeps_experts_mxfp4_and_marks_them_passthrough():
    p = plan(experts_mxfp4(4, 64), C20, source_experts_mxfp4=True)
    experts = {m.path for m in linear_modules(C20) if m.experts}
    assert p.passthrough == experts and all(p.specs[e] == QuantSpec(4, 32, "mxfp4") for e in experts)
    assert p.top == QuantSpec(4, 32, "mxfp4")
    assert specs_of_kind(p, "router")[0] == QuantSpec(8, 64)
    assert plan(experts_mxfp4(4, 64), C20).passthrough == frozenset()


def test_dry_run_table_prints_mlx_lm_bits_per_weight_and_gigabytes():
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=150).print(render_table(plan(uniform(4, 64), C20)))
    text = out.getvalue()
    assert "4.504" in text and "11.78 GB" in text
    rows = plan(uniform(4, 64), C20).table()
    assert [r.kind for r in rows] == [
        "embed_tokens",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "router",
        "lm_head",
        "norms",
        "sinks",
    ]
    assert [(r.count, r.spec) for r in rows if r.kind == "router"] == [(24, QuantSpec(8, 64))]


# ---- user recipe files --------------------------------------------------------------------------------
TIERED_36_TOML = """
name = "tiered as a file"
default = { keep = true }

[[rules]]
match = "router"
keep = true

[[rules]]
match = ["embed_tokens", "lm_head", "*.v_proj", "re:o_proj$"]
bits = 6

[[rules]]
match = ["q_proj", "k_proj"]
layers = "0-5, 30-35"
bits = 6
group_size = 64
mode = "affine"

[[rules]]
match = ["q_proj", "k_proj"]
layers = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35]
bits = 6

[[rules]]
match = ["q_proj", "k_proj"]
bits = 4

[[rules]]
match = "*.experts.*"
bits = 3
"""


def write_json_twin(tmp_path: Path) -> Path:
    tomllib = pytest.importorskip("tomllib")

    path = tmp_path / "tiered.json"
    path.write_text(json.dumps(tomllib.loads(TIERED_36_TOML)))
    return path


def test_recipe_file_in_toml_and_json_reproduces_the_builtin_tiered_plan(tmp_path):
    toml_path = tmp_path / "tiered.toml"
    toml_path.write_text(TIERED_36_TOML)
    want = plan(tiered(), C120).specs
    for path in (toml_path, write_json_twin(tmp_path)):
        recipe = resolve(str(path))
        assert recipe.name == "tiered as a file"
        assert plan(recipe, C120).specs == want


def test_recipe_file_first_matching_rule_wins_and_layers_bound_a_rule(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {
                "default": {"bits": 4},
                "rules": [
                    {"match": "down_proj", "layers": "2-3", "bits": 8},
                    {"match": "*.experts.*", "bits": 2, "group_size": 32},
                    {"match": "down_proj", "bits": 6},
                ],
            }
        )
    )
    p = plan(from_file(path), PRESETS["tiny"])
    assert {i: s.bits for i, s in specs_of_kind(p, "down_proj").items()} == {0: 2, 1: 2, 2: 8, 3: 8}
    assert specs_of_kind(p, "gate_proj")[0] == QuantSpec(2, 32)
    assert p.specs["lm_head"] == QuantSpec(4, 64) and p.top == QuantSpec(4, 64)
    assert path.stem == from_file(path).name


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"default": {"bits": 4}, "rulez": []}, "unknown key(s) ['rulez']"),
        ({"rules": []}, "needs a `default` table"),
        ({"default": {"bits": 4}, "rules": [{"match": "q_proj", "bits": 7}]}, "rule 1: affine quantization"),
        (
            {"default": {"bits": 4}, "rules": [{"match": "*", "keep": True}, {"match": "x", "bit": 4}]},
            "rule 2: unknown key(s) ['bit']",
        ),
        ({"default": {"bits": 4}, "rules": [{"match": "q", "bits": 4, "layers": "0.5"}]}, "rule 1: `layers`"),
        ({"default": {"bits": 4}, "rules": [{"match": "re:(", "bits": 4}]}, "rule 1: bad regular expression"),
        ({"default": {"bits": 4}, "rules": [{"bits": 4}]}, "rule 1: `match`"),
        ({"default": {"group_size": 64}}, "default: give `bits`"),
        ({"default": {"keep": True, "bits": 4}}, "default: `keep = true` cannot"),
        ({"default": {"bits": "4"}}, "default: `bits` must be an integer"),
    ],
)
def test_bad_recipe_file_is_rejected_naming_file_and_rule(tmp_path, doc, says):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UnsupportedQuantization) as e:
        from_file(path)
    assert str(path) in str(e.value) and says in str(e.value)


def test_unparsable_or_missing_recipe_file_is_an_ossq_error(tmp_path):
    (tmp_path / "a.toml").write_text("default = {bits = 4")
    (tmp_path / "b.json").write_text("{")
    for name, says in (("a.toml", "not valid TOML"), ("b.json", "not valid JSON"), ("c.json", "cannot read")):
        with pytest.raises(OssqError, match=says):
            from_file(tmp_path / name)


# ---- resolve: the CLI's --recipe ----------------------------------------------------------------------
def test_resolve_maps_builtin_names_to_recipes():
    assert resolve(None) == uniform(4, 64) == resolve("uniform", bits=4)
    assert resolve(None, mode="mxfp4").top == QuantSpec(4, 32, "mxfp4")
    assert resolve("mixed_2_6", group_size=32) == mixed("mixed_2_6", 32)
    assert resolve("tiered") == tiered(64)
    assert resolve("mxfp4-experts", bits=6) == experts_mxfp4(6, 64)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("mixed_5_8", {}), "choose one of uniform, mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6, tiered"),
        (("tiered", {"bits": 4}), "fixes its own bits"),
        (("mixed_3_6", {"mode": "mxfp4"}), "affine-only"),
        (("my.toml", {"bits": 4}), "sets its own bits"),
        ((None, {"bits": 7}), "supports bits"),
    ],
)
def test_resolve_rejects_unknown_names_and_conflicting_flags(args, says):
    name, kwargs = args
    with pytest.raises(UnsupportedQuantization, match=says):
        resolve(name, **kwargs)
    assert set(BUILTIN) >= {"uniform", "tiered", "mxfp4-experts"}


# ---- oracle: mlx-lm on small gpt_oss models -----------------------------------------------------------
def small_config(layers: int) -> ModelConfig:
    """The real layer pattern at toy width: 192 is no multiple of 128, o_proj's 128 is (as 2880, 4096)."""
    return ModelConfig(
        vocab_size=256,
        hidden_size=192,
        intermediate_size=192,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def mlx_model(config: ModelConfig):
    mx = pytest.importorskip("mlx.core")
    gpt_oss = pytest.importorskip("mlx_lm.models.gpt_oss")
    model = gpt_oss.Model(gpt_oss.ModelArgs.from_dict(config.to_dict()))
    model.set_dtype(mx.bfloat16)  # as loaded from the bf16 checkpoint; the private rope _freqs stay float32
    return model


def mlx_specs(model, config: ModelConfig) -> dict[str, QuantSpec | None]:
    modules = dict(model.named_modules())
    out = {}
    for mod in linear_modules(config):
        m = modules[mod.path]
        out[mod.path] = QuantSpec(m.bits, m.group_size or 64, m.mode) if hasattr(m, "bits") else None
    return out


@pytest.mark.parametrize("layers", [24, 36])
@pytest.mark.parametrize("name", ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"])
@pytest.mark.parametrize("group_size", [None, 32])
def test_mixed_recipe_equals_mlx_lm_mixed_predicate_for_every_module(layers, name, group_size):
    from mlx_lm.convert import mixed_quant_predicate_builder

    config = small_config(layers)
    model = mlx_model(config)
    predicate = mixed_quant_predicate_builder(name, model, group_size)
    modules = dict(model.named_modules())
    p = plan(mixed(name, group_size), config)
    for mod in linear_modules(config):
        want = predicate(mod.path, modules[mod.path])
        assert want["group_size"] == (None if p.group_size_null else p.specs[mod.path].group_size)
        assert QuantSpec(want["bits"], want["group_size"] or 64, want["mode"]) == p.specs[mod.path], mod.path


@pytest.mark.parametrize(
    ("recipe", "bits", "group_size", "mode", "predicate"),
    [
        (uniform(4, 64), 4, 64, "affine", None),
        (uniform(3, 32), 3, 32, "affine", None),
        (uniform(4, 128), 4, 128, "affine", None),
        (uniform(None, None, "mxfp4"), None, None, "mxfp4", None),
        (mixed("mixed_3_6"), None, None, "affine", "mixed_3_6"),
    ],
    ids=["u4g64", "u3g32", "u4g128", "mxfp4", "mixed_3_6"],
)
def test_plan_equals_the_storage_mlx_lm_quantize_model_chooses(recipe, bits, group_size, mode, predicate):
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters, quantize_model

    config = small_config(8)
    model = mlx_model(config)
    if predicate:
        predicate = mixed_quant_predicate_builder(predicate, model, group_size)
    quantize_model(model, {}, group_size, bits, mode=mode, quant_predicate=predicate)
    p = plan(recipe, config)
    assert mlx_specs(model, config) == p.specs
    assert get_total_parameters(model) == p.total_parameters
    assert compute_bits_per_weight(model) == p.bits_per_weight


def test_direct_flavour_equals_mlx_lm_quantizing_around_mxfp4_experts():
    import mlx.nn as nn
    from mlx_lm.utils import compute_bits_per_weight, quantize_model

    config = small_config(4)
    model = mlx_model(config)
    source = {"group_size": 32, "bits": 4, "mode": "mxfp4"}  # what mlx-lm maps quant_method mxfp4 to
    experts = {m.path for m in linear_modules(config) if m.experts}
    nn.quantize(model, class_predicate=lambda path, m: path in experts and dict(source))
    _, written = quantize_model(model, {"quantization": dict(source)}, None, 4)
    p = plan(experts_mxfp4(4, 64), config, source_experts_mxfp4=True)
    assert mlx_specs(model, config) == p.specs
    assert QuantSpec.from_config(written["quantization"]) == p.top
    assert compute_bits_per_weight(model) == p.bits_per_weight


@pytest.mark.parametrize("recipe", [tiered(), tiered(32), mixed("mixed_2_6", 32)], ids=["t64", "t32", "m26"])
def test_size_report_equals_mlx_lm_accounting_of_a_model_stored_as_planned(recipe):
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters

    config = small_config(12)
    model = mlx_model(config)
    p = plan(recipe, config)
    nn.quantize(model, class_predicate=lambda path, m: _as_mlx_params(p.specs.get(path)))
    assert mlx_specs(model, config) == p.specs
    assert get_total_parameters(model) == p.total_parameters
    assert sum(v.nbytes for _, v in tree_flatten(model.parameters())) == p.total_bytes
    assert compute_bits_per_weight(model) == p.bits_per_weight


def _as_mlx_params(spec: QuantSpec | None):
    return False if spec is None else {"group_size": spec.group_size, "bits": spec.bits, "mode": spec.mode}


def test_bits_per_weight_counts_rope_freqs_only_when_mlx_lm_keeps_them():
    from mlx_lm.utils import compute_bits_per_weight, quantize_model

    for config in (small_config(4), dataclasses.replace(small_config(4), rope_scaling=None)):
        model = mlx_model(config)  # YaRN keeps float32 `_freqs` per layer; plain RoPE keeps no array
        quantize_model(model, {}, 64, 4)
        assert compute_bits_per_weight(model) == plan(uniform(4, 64), config).bits_per_weight
