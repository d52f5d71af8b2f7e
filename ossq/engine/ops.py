"""The ops interface: the hot operations of the model, and their plain-torch reference.

`engine/model.py` calls only these methods for its heavy lifting, so a faster implementation (Triton on
CUDA) is a subclass that overrides them — there is never a second copy of the model. `TorchOps` is the
CPU path and the oracle every faster implementation is tested against.

A "linear" argument is any object with `weight`, `spec` (QuantSpec | None), `scales`, `biases` (affine)
and `bias` attributes (None when absent), stored as MLX stores them (formats/mlx.py); the layout-specific decoding
lives in `quant/`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ossq.quant import affine, mxfp4


def dequantize(lin: Any, index: Any = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Full-precision rows of `lin`'s weight selected by `index` along its first axis (an expert, a tensor
    of embedding rows, or everything)."""
    w, s, b = (None if t is None else _take(t, index) for t in (lin.weight, lin.scales, lin.biases))
    spec = lin.spec
    if spec is None:
        return w.to(dtype)
    if spec.mode == "mxfp4":
        return mxfp4.decode(w, s, dtype=dtype)
    return affine.dequantize(w, s, b, bits=spec.bits, group_size=spec.group_size, dtype=dtype)


def _take(t: torch.Tensor, index: Any) -> torch.Tensor:
    # CUDA has no gather kernel for uint32: gather the same bits as int32.
    if t.dtype == torch.uint32 and isinstance(index, torch.Tensor):
        return t.view(torch.int32)[index].view(torch.uint32)
    return t[index]


class TorchOps:
    """Reference implementation: readable, device-agnostic, computes in the activation dtype except
    where noted (norms, softmaxes and attention run in float32)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (weight * h).to(x.dtype)

    def linear(self, x: torch.Tensor, lin: Any) -> torch.Tensor:
        """(…, in) → (…, out), y = x Wᵀ + b."""
        return F.linear(x, dequantize(lin, dtype=x.dtype), lin.bias)

    def embedding(self, ids: torch.Tensor, emb: Any, dtype: torch.dtype) -> torch.Tensor:
        """(B, T) ids → (B, T, C); dequantizes only the rows it gathers."""
        rows = dequantize(emb, ids.reshape(-1), dtype=dtype)
        return rows.reshape(*ids.shape, -1)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate halves (NeoX style): x (B, T, heads, D), cos/sin (T, D/2) already scaled by YaRN."""
        x1, x2 = x.chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sinks: torch.Tensor,
        *,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        window: int | None,
        scale: float,
    ) -> torch.Tensor:
        """Causal GQA attention with per-head sink logits.

        q (B, T, H, D); k, v (B, S, K, D) cache slots; q_pos (T,), k_pos (S,) absolute positions (−1 = empty
        slot); query t sees key j iff 0 ≤ pos_j ≤ pos_t and pos_j > pos_t − window. The sink S_h only enlarges
        the softmax denominator (formats.md §4.7e). Returns (B, T, H, D) in q's dtype.
        """
        B, T, H, D = q.shape
        rep = H // k.shape[2]
        qh = q.float().transpose(1, 2)  # (B, H, T, D)
        kh = k.float().repeat_interleave(rep, dim=2).transpose(1, 2)  # (B, H, S, D)
        vh = v.float().repeat_interleave(rep, dim=2).transpose(1, 2)
        visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])  # (T, S)
        if window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - window
        scores = (qh @ kh.transpose(2, 3)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = sinks.float().reshape(1, H, 1, 1).expand(B, H, T, 1)
        logits = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
        return (probs @ vh).transpose(1, 2).to(q.dtype)

    def moe(self, x: torch.Tensor, mlp: Any, *, top_k: int, limit: float, alpha: float) -> torch.Tensor:
        """Router top-k then softmax over the k, clamped SwiGLU experts; x (N, C) → (N, C).

        Loops over the experts that were hit and dequantizes only those (formats.md §4.7 g–i).
        """
        logits = self.linear(x, mlp.router)  # (N, E)
        top_v, top_i = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(top_v.float(), dim=-1).to(x.dtype)  # (N, k)
        out = torch.zeros_like(x)
        experts = mlp.experts
        for e in torch.unique(top_i).tolist():
            tok, slot = torch.where(top_i == e)
            h = x[tok]
            gate = self.expert_linear(h, experts.gate_proj, e).clamp(max=limit)
            up = self.expert_linear(h, experts.up_proj, e).clamp(-limit, limit)
            act = gate * torch.sigmoid(gate * alpha) * (up + 1)
            y = self.expert_linear(act, experts.down_proj, e)
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out

    def expert_linear(self, x: torch.Tensor, lin: Any, expert: int) -> torch.Tensor:
        return F.linear(x, dequantize(lin, expert, dtype=x.dtype), lin.bias[expert])
