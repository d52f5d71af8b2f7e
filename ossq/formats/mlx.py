"""The MLX (mlx-lm) layout of gpt-oss: module paths, parameter names and shapes, and the
`quantization` config with its per-path overrides.

These names are also ossq's runtime parameter names, so loading any checkpoint is a strict one-to-one
match against `expected_tensors`. Rules mirror mlx-lm `models/gpt_oss.py` and `utils.py`
(shared spec formats.md §2.2, §3.5, §3.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ossq.config import ModelConfig
from ossq.errors import CheckpointError, UnsupportedQuantization

MODES = ("affine", "mxfp4")
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """How one module's weight is stored. MLX words: `bits`, `group_size`, `mode`."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    def __post_init__(self) -> None:
        if self.mode == "mxfp4":
            if (self.bits, self.group_size) != (4, 32):
                raise UnsupportedQuantization(f"mode mxfp4 needs bits 4 and group_size 32, got {self.bits}/{self.group_size}")
        elif self.mode == "affine":
            if self.bits not in AFFINE_BITS:
                raise UnsupportedQuantization(
                    f"affine quantization supports bits {AFFINE_BITS}, got {self.bits}")
            if self.group_size not in GROUP_SIZES:
                raise UnsupportedQuantization(
                    f"affine quantization supports group_size {GROUP_SIZES}, got {self.group_size}")
        else:
            raise UnsupportedQuantization(f"quantization mode {self.mode!r} is not supported; use one of {MODES}")

    @classmethod
    def from_config(cls, d: dict[str, Any], default: QuantSpec | None = None) -> QuantSpec:
        """An MLX config entry; a missing `mode` means affine, a null group size mlx-lm's default 64."""
        mode = d.get("mode") or "affine"
        base = default if default is not None and default.mode == mode else None
        group = d.get("group_size") or (base.group_size if base else (32 if mode == "mxfp4" else 64))
        bits = d.get("bits") or (base.bits if base else 4)
        return cls(bits=int(bits), group_size=int(group), mode=mode)

    def to_config(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def stored_shapes(self, lead: tuple[int, ...], in_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of `weight`, `scales` (and `biases` for affine) for `in_features` inputs per row."""
        if in_features % self.group_size:
            raise UnsupportedQuantization(
                f"group_size {self.group_size} does not divide the row length {in_features}")
        shapes = {"weight": (*lead, in_features * self.bits // 32), "scales": (*lead, in_features // self.group_size)}
        if self.mode == "affine":
            shapes["biases"] = shapes["scales"]
        return shapes

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight including the scale (and bias) of its group, with 16-bit affine scales."""
        extra = 8 if self.mode == "mxfp4" else 32
        return self.bits + extra / self.group_size


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable module: a Linear, the Embedding, or a per-expert SwitchLinear."""

    path: str
    kind: str  # embed_tokens, q_proj, k_proj, v_proj, o_proj, router, gate_proj, up_proj, down_proj, lm_head
    out_features: int
    in_features: int
    experts: int | None = None
    bias: bool = True
    layer: int | None = None

    @property
    def lead(self) -> tuple[int, ...]:
        return (self.experts, self.out_features) if self.experts else (self.out_features,)

    @property
    def numel(self) -> int:
        return (self.experts or 1) * self.out_features * self.in_features


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def linear_modules(config: ModelConfig) -> list[LinearInfo]:
    """Every quantizable module in mlx-lm's in-memory (and so file-write) order, formats.md §2.2."""
    c = config
    H, D, E, I = c.hidden_size, c.head_dim, c.num_local_experts, c.intermediate_size
    mods = [LinearInfo("model.embed_tokens", "embed_tokens", c.vocab_size, H, bias=False)]
    for i in range(c.num_hidden_layers):
        a, m = f"{layer_prefix(i)}.self_attn", f"{layer_prefix(i)}.mlp"
        mods += [
            LinearInfo(f"{a}.q_proj", "q_proj", c.num_attention_heads * D, H, layer=i),
            LinearInfo(f"{a}.k_proj", "k_proj", c.num_key_value_heads * D, H, layer=i),
            LinearInfo(f"{a}.v_proj", "v_proj", c.num_key_value_heads * D, H, layer=i),
            LinearInfo(f"{a}.o_proj", "o_proj", H, c.num_attention_heads * D, layer=i),
            LinearInfo(f"{m}.experts.gate_proj", "gate_proj", I, H, experts=E, layer=i),
            LinearInfo(f"{m}.experts.up_proj", "up_proj", I, H, experts=E, layer=i),
            LinearInfo(f"{m}.experts.down_proj", "down_proj", H, I, experts=E, layer=i),
            LinearInfo(f"{m}.router", "router", E, H, layer=i),
        ]
    mods.append(LinearInfo("lm_head", "lm_head", c.vocab_size, H, bias=False))
    return mods


def plain_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameters that are never quantized: norms and attention sinks."""
    out = {"model.norm.weight": (config.hidden_size,)}
    for i in range(config.num_hidden_layers):
        p = layer_prefix(i)
        out[f"{p}.self_attn.sinks"] = (config.num_attention_heads,)
        out[f"{p}.input_layernorm.weight"] = (config.hidden_size,)
        out[f"{p}.post_attention_layernorm.weight"] = (config.hidden_size,)
    return out


def module_tensors(mod: LinearInfo, spec: QuantSpec | None) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes one module stores under `spec` (None: unquantized)."""
    if spec is None:
        shapes = {"weight": (*mod.lead, mod.in_features)}
    else:
        shapes = spec.stored_shapes(mod.lead, mod.in_features)
    if mod.bias:
        shapes["bias"] = mod.lead
    return {f"{mod.path}.{k}": v for k, v in shapes.items()}


def expected_tensors(config: ModelConfig, specs: dict[str, QuantSpec | None]) -> dict[str, tuple[int, ...]]:
    """The complete name → shape map of a checkpoint whose modules are stored as `specs` says."""
    out = dict(plain_tensors(config))
    for mod in linear_modules(config):
        out.update(module_tensors(mod, specs.get(mod.path)))
    return out


def specs_from_config(
    quantization: dict[str, Any] | None, config: ModelConfig, keys: set[str]
) -> dict[str, QuantSpec | None]:
    """Decide each module's storage as mlx-lm's loader does (formats.md §3.6): a per-path entry wins
    (`false` = unquantized); otherwise the module is quantized with the top-level parameters iff the
    checkpoint holds `<path>.scales`."""
    if not quantization:
        stray = sorted(k for k in keys if k.endswith(".scales"))
        if stray:
            raise CheckpointError(f"config.json has no 'quantization' but the weights hold {stray[0]}")
        return {m.path: None for m in linear_modules(config)}
    top = QuantSpec.from_config(quantization)
    specs: dict[str, QuantSpec | None] = {}
    for mod in linear_modules(config):
        entry = quantization.get(mod.path)
        if entry is False:
            specs[mod.path] = None
        elif isinstance(entry, dict):
            specs[mod.path] = QuantSpec.from_config(entry, top)
        else:
            specs[mod.path] = top if f"{mod.path}.scales" in keys else None
    return specs
