"""QuantSpec: how one module's weight is stored, in MLX's words (`bits`, `group_size`, `mode`).

The valid values come from the quantizers themselves (quant/affine.py's bits and group sizes, quant/
mxfp4.py's 4-bit blocks of 32), so each rule is stated once; formats/mlx.py reads and writes the
`quantization` config entries this describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ossq.errors import UnsupportedQuantization
from ossq.quant import affine, mxfp4

MODES = ("affine", "mxfp4")


@dataclass(frozen=True)
class QuantSpec:
    """How one module's weight is stored. MLX words: `bits`, `group_size`, `mode`."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"

    def __post_init__(self) -> None:
        if self.mode == "mxfp4":
            if (self.bits, self.group_size) != (mxfp4.BITS, mxfp4.BLOCK):
                raise UnsupportedQuantization(
                    f"mode mxfp4 needs bits 4 and group_size 32, got {self.bits}/{self.group_size}"
                )
        elif self.mode == "affine":
            if self.bits not in affine.BITS:
                raise UnsupportedQuantization(f"affine quantization supports bits {affine.BITS}, got {self.bits}")
            if self.group_size not in affine.GROUP_SIZES:
                raise UnsupportedQuantization(
                    f"affine quantization supports group_size {affine.GROUP_SIZES}, got {self.group_size}"
                )
        else:
            raise UnsupportedQuantization(f"quantization mode {self.mode!r} is not supported; use one of {MODES}")

    @classmethod
    def from_config(cls, d: dict[str, Any], default: QuantSpec | None = None) -> QuantSpec:
        """An MLX config entry; a missing `mode` means affine, a null group size mlx-lm's default 64."""
        mode = d.get("mode") or "affine"
        base = default if default is not None and default.mode == mode else None
        group = d.get("group_size")  # null: the default (mlx-lm writes it for mixed recipes); 0 is refused
        group = (base.group_size if base else (mxfp4.BLOCK if mode == "mxfp4" else 64)) if group is None else group
        bits = d.get("bits")
        bits = (base.bits if base else 4) if bits is None else bits
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, group)):
            raise UnsupportedQuantization(f"quantization entry {d!r}: bits and group_size must be integers")
        return cls(bits=bits, group_size=group, mode=mode)

    def to_config(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def stored_shapes(self, lead: tuple[int, ...], in_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of `weight`, `scales` (and `biases` for affine) for `in_features` inputs per row."""
        if in_features % self.group_size:
            raise UnsupportedQuantization(f"group_size {self.group_size} does not divide the row length {in_features}")
        shapes = {"weight": (*lead, in_features * self.bits // 32), "scales": (*lead, in_features // self.group_size)}
        if self.mode == "affine":
            shapes["biases"] = shapes["scales"]
        return shapes

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight including the scale (and bias) of its group, with 16-bit affine scales."""
        extra = 8 if self.mode == "mxfp4" else 32
        return self.bits + extra / self.group_size
