"""GPTQ: error-compensating rounding of a weight into MLX affine groups (Frantar et al. 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1).

Columns of W (R, C) are quantized left to right; each column's rounding error, divided by the diagonal
of the upper Cholesky factor U of H⁻¹ (H = Σ x xᵀ over the layer's calibration inputs, damped), is taken
out of the columns not yet quantized, which minimises the layer-wise objective ||W X − Ŵ X||² greedily.
Errors inside a block of BLOCK_COLUMNS columns are applied column by column, the block's accumulated
error to the rest of the row in one matmul ("lazy batch updates").

The output is plain MLX affine (quant/affine.py): each group of G columns gets its (scale, bias) by
mlx's own rule from the group's weights as they stand when the algorithm reaches the group's first
column, and its codes are round((w − bias) / scale) with the unrounded float32 scale and bias, as
`mx.quantize` computes them; stored scales and biases are rounded to the weight's dtype. So with a
diagonal H (no error propagates) the result is round-to-nearest — `mx.quantize` — bit for bit.

A leading batch axis (experts) runs all its matrices through the same column loop at once.
Memory: W in float32 twice (the working copy and the block errors) plus B × C² for U.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ossq.quant import affine

DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (the paper's λ)
BLOCK_COLUMNS = 128  # a multiple of every affine group size, so a group never straddles two blocks


def quantize(
    w: Tensor, hessian: Tensor, *, bits: int, group_size: int, damp: float = DAMP
) -> tuple[Tensor, Tensor, Tensor]:
    """w (…, R, C) float and hessian (…, C, C) float32 (one per leading index, or one (C, C) for all) →
    (wq uint32 (…, R, C·bits/32), scales, biases (…, R, C/G) in w's dtype), as affine.quantize returns."""
    affine.check(bits, group_size, w.shape[-1])
    R, C = w.shape[-2:]
    lead = w.shape[:-2]
    W = w.reshape(-1, R, C).to(torch.float32).clone()  # (B, R, C) working copy, updated in place
    H = hessian.to(device=w.device, dtype=torch.float32).reshape(-1, C, C).expand(W.shape[0], C, C)
    U = inverse_cholesky(H, damp)  # (B, C, C) upper
    codes = torch.empty(W.shape, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*W.shape[:2], C // group_size, dtype=w.dtype, device=w.device)
    biases = torch.empty_like(scales)
    for b0 in range(0, C, BLOCK_COLUMNS):
        b1 = min(b0 + BLOCK_COLUMNS, C)
        errors = _block(W, U, codes, scales, biases, b0, b1, bits=bits, group_size=group_size)  # (B, R, b1−b0)
        W[:, :, b1:] -= errors @ U[:, b0:b1, b1:]
    wq = affine.pack(codes, bits)
    return wq.reshape(*lead, R, -1), scales.reshape(*lead, R, -1), biases.reshape(*lead, R, -1)


def _block(
    W: Tensor, U: Tensor, codes: Tensor, scales: Tensor, biases: Tensor, b0: int, b1: int, *, bits: int, group_size: int
) -> Tensor:
    """Quantize columns b0 … b1 − 1 of W into `codes`, `scales`, `biases`, compensating inside the block;
    → the scaled errors (B, R, b1 − b0) that the columns right of the block still have to absorb."""
    errors = torch.empty(*W.shape[:2], b1 - b0, dtype=torch.float32, device=W.device)
    top = torch.full((), 2**bits - 1, dtype=torch.float32, device=W.device)
    for col in range(b0, b1):
        if col % group_size == 0:
            g = col // group_size
            s, beta = group_params(W[:, :, col : col + group_size], bits)  # (B, R) float32, unrounded
            scales[:, :, g], biases[:, :, g] = s, beta  # stored rounded to the weight dtype
            s_stored, beta_stored = scales[:, :, g].float(), biases[:, :, g].float()
        q = torch.round((W[:, :, col] - beta) / s).clamp_(torch.zeros_like(top), top)
        codes[:, :, col] = q.to(torch.uint8)
        err = (W[:, :, col] - (q * s_stored + beta_stored)) / U[:, col, col, None]  # (B, R)
        W[:, :, col + 1 : b1] -= err[:, :, None] * U[:, None, col, col + 1 : b1]
        errors[:, :, col - b0] = err
    return errors


def group_params(group: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """One group of columns (…, G) float32 → mlx's unrounded float32 (scale, bias) (…,), computed by
    affine.quantize itself so the rule is stated once."""
    _, s, beta = affine.quantize(group.contiguous(), bits=bits, group_size=group.shape[-1])
    return s[..., 0], beta[..., 0]


def inverse_cholesky(H: Tensor, damp: float = DAMP) -> Tensor:
    """(B, C, C) Hessians → the upper Cholesky factors of their damped inverses. A column no calibration
    input touched (zero diagonal) gets a unit diagonal, so it is rounded to nearest and passes no error
    on; a Hessian of all zeros (an expert no token was routed to) becomes the identity: plain RTN."""
    H = H.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    H[dead.unsqueeze(-1) & torch.eye(H.shape[-1], dtype=torch.bool, device=H.device)] = 1.0
    mean = diag.mean(-1, keepdim=True)
    for attempt in range(4):  # more damping until the factorisation succeeds (a nearly singular H)
        lam = damp * 10**attempt
        damped = H + torch.diag_embed((lam * mean).expand_as(diag))
        L, info = torch.linalg.cholesky_ex(damped.double())
        if not bool(info.any()):
            break
    inverse = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(inverse, upper=True).float()
