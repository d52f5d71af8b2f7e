"""ModelConfig: the gpt-oss hyper-parameters, read from a checkpoint's config.json.

Field names are Hugging Face's. Both rope layouts are accepted: the published checkpoints'
`rope_scaling` + `rope_theta`, and transformers 5's `rope_parameters` (which folds `rope_theta` in).
`to_dict` always writes the published layout because mlx-lm ignores `rope_parameters`
(shared spec formats.md §7, offline.md "pitfall 1").

A config.json must name `model_type: gpt_oss` and every key that fixes a tensor shape (`REQUIRED_KEYS`);
the other fields are optional with the defaults of transformers' `GptOssConfig`
(models/gpt_oss/configuration_gpt_oss.py), which equal gpt-oss-20b's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ossq.errors import ConfigError

SLIDING = "sliding_attention"
FULL = "full_attention"
ARCHITECTURE = "GptOssForCausalLM"
MODEL_TYPE = "gpt_oss"


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (the only scaling gpt-oss uses). `truncate=False` means no floor/ceil of the
    correction range, as the reference and the published config say; transformers defaults to True."""

    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False
    rope_type: str = "yarn"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeScaling:
        rope_type = d.get("rope_type", d.get("type", "yarn"))
        if rope_type != "yarn":
            raise ConfigError(
                f"config.json: rope_scaling.rope_type {rope_type!r} is not supported (gpt-oss uses 'yarn')"
            )
        for key in ("factor", "original_max_position_embeddings"):
            if d.get(key) is None:
                raise ConfigError(f"config.json: rope_scaling lacks the field {key!r}")
        numbers = {"beta_fast": 32.0, "beta_slow": 1.0}  # transformers' defaults
        for key in ("factor", "beta_fast", "beta_slow", "original_max_position_embeddings"):
            value = d.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"config.json: rope_scaling.{key} must be a number, got {value!r}")
            numbers[key] = value
        return cls(
            factor=float(numbers["factor"]),
            beta_fast=float(numbers["beta_fast"]),
            beta_slow=float(numbers["beta_slow"]),
            original_max_position_embeddings=int(numbers["original_max_position_embeddings"]),
            truncate=bool(d.get("truncate", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of one gpt-oss model. Defaults are gpt-oss-20b's, for presets and tests; a
    config.json must state the shapes itself (`from_dict`)."""

    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: tuple[str, ...] = field(default=())
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    eos_token_id: tuple[int, ...] = (200002, 199999, 200012)
    pad_token_id: int | None = 199999
    bos_token_id: int | None = 199998

    def __post_init__(self) -> None:
        if not self.layer_types:
            alternating = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", alternating)
        self._validate()

    def _validate(self) -> None:
        for name in (*REQUIRED_KEYS, "num_experts_per_tok", "sliding_window", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
                f"({self.num_local_experts})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config.json: layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"config.json: layer_types holds unknown kinds {bad}; expected {SLIDING!r}/{FULL!r}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0 and self.swiglu_limit > 0):
            raise ConfigError("config.json: rms_norm_eps, rope_theta and swiglu_limit must be positive")

    # ---- derived values -------------------------------------------------------------------------
    def window(self, layer: int) -> int | None:
        """Keys a query of `layer` may see (including itself), or None for unbounded."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @property
    def attention_factor(self) -> float:
        """YaRN's concentration, applied to cos/sin (so to q and k both)."""
        if self.rope_scaling is None or self.rope_scaling.factor <= 1:
            return 1.0
        return 0.1 * math.log(self.rope_scaling.factor) + 1.0

    # ---- (de)serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A config.json's fields. The keys that fix a tensor shape (`REQUIRED_KEYS`) and `model_type` must
        be present; every other field takes transformers' `GptOssConfig` default when it is missing, and
        `layer_types` its derivation (sliding, full, sliding, …). A field of the wrong type is named."""
        _check_model_type(d)
        missing = [k for k in REQUIRED_KEYS if k not in d and ALIASES.get(k) not in d]
        if missing:
            raise ConfigError(
                f"config.json: missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                "(a gpt-oss config.json states every shape; ossq guesses none)"
            )
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name if f.name in d else ALIASES.get(f.name)
            if key in d and f.name not in SPECIAL_KEYS:
                kwargs[f.name] = _float(f.name, d[key]) if f.name in FLOAT_KEYS else d[key]
        kwargs.update(_derived(d))
        kwargs.update(_token_ids(d))
        kwargs.update(_rope(d))
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_config_json(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        """The published Hugging Face config.json layout (rope_scaling + rope_theta at top level)."""
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_id"] = list(self.eos_token_id)
        d["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        d["experts_per_token"] = self.num_experts_per_tok
        d["initial_context_length"] = (
            self.rope_scaling.original_max_position_embeddings if self.rope_scaling else self.max_position_embeddings
        )
        d.update(
            architectures=[ARCHITECTURE],
            model_type=MODEL_TYPE,
            attention_bias=True,
            attention_dropout=0.0,
            hidden_act="silu",
            tie_word_embeddings=False,
            output_router_logits=False,
            router_aux_loss_coef=0.9,
            initializer_range=0.02,
            use_cache=True,
        )
        return dict(sorted(d.items()))


# Keys that fix a tensor shape: without them the weights would be read under a guessed shape (transformers
# guesses gpt-oss-120b's, ossq used to guess 20b's), so a config.json must state them.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
)
ALIASES = {"num_local_experts": "num_experts", "num_experts_per_tok": "experts_per_token"}  # transformers' names
SPECIAL_KEYS = ("rope_scaling", "rope_theta", "layer_types", "eos_token_id", "pad_token_id", "bos_token_id")
FLOAT_KEYS = ("rms_norm_eps", "swiglu_limit", "swiglu_alpha")


def _check_model_type(d: dict[str, Any]) -> None:
    archs = d.get("architectures") or [ARCHITECTURE]
    model_type = d.get("model_type")
    if model_type is None:
        raise ConfigError(
            f'config.json: missing required key model_type (a gpt-oss config has "model_type": "{MODEL_TYPE}")'
        )
    if model_type != MODEL_TYPE or not isinstance(archs, list) or ARCHITECTURE not in archs:
        raise ConfigError(
            f"config.json: architecture {archs} / model_type {model_type!r} is not gpt-oss "
            f"(expected {ARCHITECTURE!r} / {MODEL_TYPE!r})"
        )


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.json: {name} must be a number, got {value!r}")
    return float(value)


def _derived(d: dict[str, Any]) -> dict[str, Any]:
    """head_dim and num_key_value_heads given as null, and layer_types, as transformers derives them."""
    out: dict[str, Any] = {}
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
    if d.get("head_dim", 0) is None and _is_positive_int(heads) and _is_positive_int(hidden):
        out["head_dim"] = hidden // heads
    if d.get("num_key_value_heads", 0) is None:
        out["num_key_value_heads"] = heads
    if d.get("layer_types") is not None:
        kinds = d["layer_types"]
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise ConfigError(f"config.json: layer_types must be a list of {SLIDING!r}/{FULL!r}, got {kinds!r}")
        out["layer_types"] = tuple(kinds)
    return out


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _token_ids(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "eos_token_id" in d:
        eos = d["eos_token_id"]
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConfigError(f"config.json: eos_token_id must be a token id or a list of them, got {eos!r}")
        out["eos_token_id"] = tuple(ids)
    for key in ("pad_token_id", "bos_token_id"):
        if key in d:
            value = d[key]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"config.json: {key} must be a token id or null, got {value!r}")
            out[key] = value
    return out


def _rope(d: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling from either layout (module docstring); missing = transformers' yarn."""
    out: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ConfigError(f"config.json: {key} must be an object or null, got {d[key]!r}")
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta"))
    if theta is not None:
        out["rope_theta"] = _float("rope_theta", theta)
    if rope is not None and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        out["rope_scaling"] = RopeScaling.from_dict(rope)
    elif rope is not None or "rope_scaling" in d:
        out["rope_scaling"] = None
    return out


PRESETS: dict[str, ModelConfig] = {
    "20b": ModelConfig(),
    "120b": ModelConfig(num_hidden_layers=36, num_local_experts=128),
    # Small enough for CPU tests, yet with every feature live: 2 sliding + 2 full layers, GQA with 2 query
    # heads per KV head, a window shorter than test prompts, and a YaRN band that covers several frequencies
    # (original context 64, so test positions run past it). The vocabulary stays real so the real
    # tokenizer can drive it.
    "tiny": ModelConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=4096,
        rope_scaling=RopeScaling(original_max_position_embeddings=64),
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def read_config_json(path: Path) -> dict[str, Any]:
    """A config.json as a dict, with errors that name the file."""
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path.parent}: no config.json; is this a gpt-oss checkpoint directory?") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d
