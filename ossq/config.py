"""ModelConfig: the gpt-oss hyper-parameters, read from a checkpoint's config.json.

Field names are Hugging Face's. Both rope layouts are accepted: the published checkpoints'
`rope_scaling` + `rope_theta`, and transformers 5's `rope_parameters` (which folds `rope_theta` in).
`to_dict` always writes the published layout because mlx-lm ignores `rope_parameters`
(shared spec formats.md §7, offline.md "pitfall 1").
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
        try:
            return cls(
                factor=float(d["factor"]),
                beta_fast=float(d.get("beta_fast") or 32.0),
                beta_slow=float(d.get("beta_slow") or 1.0),
                original_max_position_embeddings=int(d["original_max_position_embeddings"]),
                truncate=bool(d.get("truncate", True)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json: rope_scaling lacks the field {e.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of one gpt-oss model. Defaults are gpt-oss-20b's."""

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
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_local_experts",
            "num_experts_per_tok",
            "sliding_window",
            "max_position_embeddings",
        ):
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
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

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
        archs = d.get("architectures") or [ARCHITECTURE]
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE or ARCHITECTURE not in archs:
            raise ConfigError(
                f"config.json: architecture {archs} / model_type {d.get('model_type')!r} is not gpt-oss "
                f"(expected {ARCHITECTURE!r} / {MODEL_TYPE!r})"
            )
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d and f.name not in ("rope_scaling", "rope_theta", "layer_types", "eos_token_id"):
                kwargs[f.name] = d[f.name]
        if "layer_types" in d:
            kwargs["layer_types"] = tuple(d["layer_types"])
        if "eos_token_id" in d:
            eos = d["eos_token_id"]
            kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (int(eos),)
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta"))
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        if rope is not None and rope.get("rope_type", rope.get("type")) not in (None, "default"):
            kwargs["rope_scaling"] = RopeScaling.from_dict(rope)
        elif rope is not None or "rope_scaling" in d:
            kwargs["rope_scaling"] = None
        if isinstance(kwargs.get("head_dim"), type(None)):
            kwargs.pop("head_dim")
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d
