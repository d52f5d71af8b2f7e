"""ModelConfig from config.json: both rope layouts, presets, and errors that name the field."""

from __future__ import annotations

import re

import pytest

from ossq.config import FULL, PRESETS, REQUIRED_KEYS, SLIDING, ModelConfig, RopeScaling, preset
from ossq.errors import ConfigError

PUBLISHED_20B = {  # the fields of openai/gpt-oss-20b's config.json that ossq reads (formats.md §4.4)
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "eos_token_id": 200002,
    "head_dim": 64,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "layer_types": [SLIDING, FULL] * 12,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "pad_token_id": 199999,
    "rms_norm_eps": 1e-05,
    "rope_theta": 150000,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "vocab_size": 201088,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
}


def test_published_config_equals_the_20b_preset_except_eos():
    config = ModelConfig.from_dict(PUBLISHED_20B)
    assert config.eos_token_id == (200002,)
    assert config == ModelConfig(**{**PRESETS["20b"].__dict__, "eos_token_id": (200002,)})
    assert config.rope_scaling == RopeScaling(truncate=False)
    assert config.attention_factor == pytest.approx(1.3465735902799727, rel=1e-15)


def test_transformers_5_rope_parameters_layout_reads_the_same():
    d = {k: v for k, v in PUBLISHED_20B.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**PUBLISHED_20B["rope_scaling"], "rope_theta": 150000.0}
    assert ModelConfig.from_dict(d) == ModelConfig.from_dict(PUBLISHED_20B)


def test_to_dict_round_trips_and_writes_the_published_rope_layout():
    for config in PRESETS.values():
        d = config.to_dict()
        assert "rope_parameters" not in d and d["rope_theta"] == 150000.0 and d["rope_scaling"]["rope_type"] == "yarn"
        assert ModelConfig.from_dict(d) == config


def test_missing_truncate_follows_transformers_default_true():
    d = {**PUBLISHED_20B, "rope_scaling": {**PUBLISHED_20B["rope_scaling"]}}
    del d["rope_scaling"]["truncate"]
    assert ModelConfig.from_dict(d).rope_scaling.truncate is True


def test_120b_preset_shapes():
    c = preset("120b")
    assert (c.num_hidden_layers, c.num_local_experts, c.layer_types[:2]) == (36, 128, (SLIDING, FULL))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
        ({"num_key_value_heads": 7}, "num_key_value_heads"),
        ({"num_experts_per_tok": 64}, "num_experts_per_tok"),
        ({"layer_types": [SLIDING] * 3}, "layer_types"),
        ({"layer_types": ["local"] * 24}, "layer_types"),
        ({"hidden_size": -1}, "hidden_size"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0}}, "original_max_position_embeddings"),
    ],
)
def test_bad_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**PUBLISHED_20B, **change})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="tiny"):
        preset("7b")


# ---- required and optional keys: transformers' GptOssConfig is the oracle for the optional ones -----
@pytest.mark.parametrize("key", [*REQUIRED_KEYS, "model_type"])
def test_a_missing_shape_key_or_model_type_is_named_not_guessed(key):
    d = {k: v for k, v in PUBLISHED_20B.items() if k != key}
    with pytest.raises(ConfigError, match=rf"missing required key {key}\b"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize(
    "key",
    [
        "num_experts_per_tok",
        "sliding_window",
        "layer_types",
        "rms_norm_eps",
        "swiglu_limit",
        "swiglu_alpha",
        "max_position_embeddings",
        "rope_theta",
        "rope_scaling",
    ],  # fmt: skip
)
def test_a_missing_optional_key_takes_transformers_gpt_oss_default(key):
    transformers = pytest.importorskip("transformers")
    d = {k: v for k, v in PUBLISHED_20B.items() if k != key}
    ours, ref = ModelConfig.from_dict(d), transformers.GptOssConfig(**d)
    rope = ref.rope_parameters
    assert ours.rope_theta == rope["rope_theta"] and ours.rope_scaling.factor == rope["factor"]
    assert ours.rope_scaling.truncate == rope["truncate"]
    assert ours.rope_scaling.original_max_position_embeddings == rope["original_max_position_embeddings"]
    assert list(ours.layer_types) == list(ref.layer_types)
    for field in ("num_experts_per_tok", "sliding_window", "rms_norm_eps", "swiglu_limit", "swiglu_alpha",
                  "max_position_embeddings"):  # fmt: skip
        assert getattr(ours, field) == getattr(ref, field), field


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "model_type 'llama' is not gpt-oss"),
        ({"rms_norm_eps": "small"}, "rms_norm_eps must be a number"),
        ({"layer_types": "sliding_attention"}, "layer_types must be a list"),
        ({"rope_scaling": "yarn"}, "rope_scaling must be an object"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": "x", "original_max_position_embeddings": 4096}},
            "rope_scaling.factor must be a number",
        ),  # fmt: skip
        ({"eos_token_id": "200002"}, "eos_token_id must be a token id"),
        ({"pad_token_id": True}, "pad_token_id must be a token id"),
        ({"hidden_size": "2880"}, "hidden_size must be a positive integer"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict({**PUBLISHED_20B, **change})


def test_null_head_dim_and_kv_heads_are_derived_as_transformers_does():
    c = ModelConfig.from_dict(
        {**PUBLISHED_20B, "head_dim": None, "num_attention_heads": 45, "num_key_value_heads": None}
    )
    assert (c.head_dim, c.num_key_value_heads) == (2880 // 45, 45)
