"""AWQ: activation-aware per-input-channel scales (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration"), folded into the RMSNorm that feeds the weights.

Channels that carry large activations matter most, so their weight columns are scaled up by s before
rounding (their relative rounding error shrinks) and the input is scaled down by the same s. The input
here is an RMSNorm's output, so the 1/s goes into the norm's weight: `norm.weight / s`, `W · diag(s)` for
every linear that reads the norm — q/k/v after input_layernorm; router, gate and up after
post_attention_layernorm. The router is scaled with the experts, so its logits, and the routing, are
unchanged; before quantization the folded model computes the same function as the original.

s = a^α / √(max a^α · min a^α) with a the input's per-channel RMS (√(diag H / N)); α is searched on a grid
for the least predicted output error Σ_modules tr(ΔW H ΔWᵀ) = Σ ||W X − Ŵ X||² over the calibration
inputs, ΔW = Q(W·s)/s − W with Q round-to-nearest at each module's spec. α = 0 (s = 1) is plain RTN and
on the grid, so the search never predicts worse than RTN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ossq.quant import affine, mxfp4
from ossq.quant.spec import QuantSpec

ALPHAS = tuple(i / 20 for i in range(21))
_MIN_RMS = 1e-6


def channel_rms(hessian: Tensor, tokens: int) -> Tensor:
    """(C, C) Σ x xᵀ over `tokens` inputs → (C,) per-channel RMS of the input."""
    return (hessian.diagonal() / max(tokens, 1)).clamp_min(0).sqrt()


def scales_for(rms: Tensor, alpha: float) -> Tensor:
    s = rms.clamp_min(_MIN_RMS) ** alpha
    return s / (s.max() * s.min()).sqrt()


def search(
    weights: Sequence[Tensor], hessians: Sequence[Tensor], specs: Sequence[QuantSpec | None], *, rms: Tensor
) -> Tensor:
    """The scales (C,) float32 for linears `weights` ((…, R, C) float) that read one input, each with its
    input Hessian ((C, C), or (E, C, C) for an expert stack) and output spec (None: kept unquantized, no
    error, but still scaled)."""
    best, best_loss = torch.ones_like(rms), float("inf")
    for alpha in ALPHAS:
        s = scales_for(rms, alpha)
        loss = sum(output_error(w, h, spec, s) for w, h, spec in zip(weights, hessians, specs, strict=True))
        if loss < best_loss:
            best, best_loss = s, float(loss)
    return best


def output_error(w: Tensor, hessian: Tensor, spec: QuantSpec | None, s: Tensor) -> float:
    """Σ ||W X − Ŵ X||² for Ŵ = Q(W·diag(s)) · diag(1/s), from H = Σ x xᵀ: tr(ΔW H ΔWᵀ)."""
    if spec is None:
        return 0.0
    delta = fake_quantize(w.float() * s, spec) / s - w.float()  # (…, R, C)
    h = hessian if hessian.dim() == delta.dim() else hessian.expand(*delta.shape[:-2], *hessian.shape)
    return float(((delta @ h) * delta).sum())


def fake_quantize(w: Tensor, spec: QuantSpec) -> Tensor:
    """Round-to-nearest at `spec`, dequantized to float32 (as the stored weights would decode)."""
    if spec.mode == "mxfp4":
        wq, sc = mxfp4.quantize(w.to(torch.bfloat16))
        return mxfp4.decode(wq, sc, dtype=torch.float32)
    wq, sc, b = affine.quantize(w.to(torch.bfloat16), bits=spec.bits, group_size=spec.group_size)
    return affine.dequantize(wq, sc, b, bits=spec.bits, group_size=spec.group_size, dtype=torch.float32)


def fold(norm_weight: Tensor, weights: Sequence[Tensor], s: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(norm.weight / s, [W · diag(s) for W]): the same function, rescaled channels."""
    return norm_weight / s, [w * s for w in weights]
