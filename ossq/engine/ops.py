"""The ops interface: the hot operations of the model, and their plain-torch reference.

`engine/model.py` calls only these methods for its heavy lifting, so a faster implementation (Triton on
CUDA) is another class with the same methods — there is never a second copy of the model. `TorchOps`
is the CPU path and the oracle every faster implementation is tested against.

Weights arrive as stored in the checkpoint (`QuantizedWeight`: MLX layout, formats/mlx.py); the
layout-specific decoding lives in `quant/`. `prepare` runs once after loading, so an implementation
may re-lay weights it owns (concatenate gate and up, swizzle MXFP4) before the first step.

The decode step never synchronises with the host: attention loops over sequences using the host copies
in `Batch`, and the mixture of experts gathers the selected experts' weights by index instead of asking
which experts were hit — below GATHER_MAX_PAIRS (token, expert) pairs. Larger steps (prefill) group
tokens by expert, which reads the routing back once per layer; a fast path does that on the device.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ossq.config import ModelConfig
from ossq.engine.batch import Batch
from ossq.engine.kv import BLOCK_TOKENS, blocks_for
from ossq.errors import OssqError
from ossq.quant import affine, mxfp4
from ossq.quant.spec import QuantSpec

# Up to this many (token, expert) pairs the reference MoE gathers one expert matrix per pair (no host
# sync, memory ∝ pairs); beyond, it dequantizes each hit expert once and runs its tokens together.
GATHER_MAX_PAIRS = 32


class QuantizedWeight(Protocol):
    """A linear layer as MLX stores it: `weight` (uint32-packed when `spec` is set, else float) with
    `scales` and, for affine, `biases` per group; an optional float `bias`. With a leading expert axis
    for the mixture of experts."""

    spec: QuantSpec | None
    weight: Tensor
    scales: Tensor | None
    biases: Tensor | None
    bias: Tensor | None


class ExpertWeights(Protocol):
    """A stack of experts; `first` is the global id of its first (not 0 when a rank holds only some of
    them, engine/parallel.py)."""

    first: int
    gate_proj: QuantizedWeight
    up_proj: QuantizedWeight
    down_proj: QuantizedWeight


class MoEWeights(Protocol):
    router: QuantizedWeight
    experts: ExpertWeights


class Ops(Protocol):
    """What the model needs from an implementation. Shapes: N tokens, H query heads, K kv heads, D head
    dim, C hidden, E experts, k experts per token; the pool rows are engine/kv.py's slots."""

    def prepare(self, model: torch.nn.Module) -> None: ...
    def graph_tokens(self, config: ModelConfig) -> int: ...
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor: ...
    def add_rms_norm(self, x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]: ...
    def linear(self, x: Tensor, lin: QuantizedWeight) -> Tensor: ...
    def linears(self, x: Tensor, lins: Sequence[QuantizedWeight]) -> list[Tensor]: ...
    def embedding(self, ids: Tensor, emb: QuantizedWeight, dtype: torch.dtype) -> Tensor: ...
    def rope_and_store(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor
    ) -> Tensor: ...
    def attention(
        self,
        q: Tensor,
        k_pool: Tensor,
        v_pool: Tensor,
        sinks: Tensor,
        batch: Batch,
        *,
        window: int | None,
        scale: float,
    ) -> Tensor: ...
    def moe(self, x: Tensor, mlp: MoEWeights, *, top_k: int, limit: float, alpha: float) -> Tensor: ...


def dequantize(lin: QuantizedWeight, index: Any = slice(None), dtype: torch.dtype = torch.float32) -> Tensor:
    """Full-precision rows of `lin`'s weight selected by `index` along its first axis (an expert, a tensor
    of expert or embedding ids, or everything)."""
    w, s, b = (None if t is None else _take(t, index) for t in (lin.weight, lin.scales, lin.biases))
    spec = lin.spec
    if spec is None:
        return w.to(dtype)
    if spec.mode == "mxfp4":
        return mxfp4.decode(w, s, dtype=dtype)
    return affine.dequantize(w, s, b, bits=spec.bits, group_size=spec.group_size, dtype=dtype)


def _take(t: Tensor, index: Any) -> Tensor:
    # CUDA has no gather kernel for uint32: gather the same bits as int32.
    if t.dtype == torch.uint32 and isinstance(index, Tensor):
        return t.view(torch.int32)[index].view(torch.uint32)
    return t[index]


def partial_experts(moe: Callable) -> Callable:
    """Marks a `moe` that honours a partial expert stack (`local_experts`), as tensor parallelism needs
    (engine/parallel.py); an override that does not carry the mark is refused under --tp."""
    moe.partial_experts = True
    return moe


class TorchOps:
    """Reference implementation: readable, device-agnostic, computes in the activation dtype except
    where noted (norms, softmaxes and attention run in float32)."""

    name = "torch"

    def prepare(self, model: torch.nn.Module) -> None:
        """Nothing to re-lay: the reference reads the stored layout as it is."""

    def graph_tokens(self, config: ModelConfig) -> int:
        """The most decode tokens a step may have for it to be captured in a CUDA graph (engine/graphs.py):
        every op then runs without a host sync and launches the same work whatever the data. None here:
        the reference attention loops over the sequences on the host."""
        return 0

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return (weight * h).to(x.dtype)

    def add_rms_norm(self, x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """The residual step: (x + delta, its RMSNorm), the sum in x's dtype."""
        total = x + delta
        return total, self.rms_norm(total, weight, eps)

    def linear(self, x: Tensor, lin: QuantizedWeight) -> Tensor:
        """(…, in) → (…, out), y = x Wᵀ + b."""
        return F.linear(x, dequantize(lin, dtype=x.dtype), lin.bias)

    def linears(self, x: Tensor, lins: Sequence[QuantizedWeight]) -> list[Tensor]:
        """Several linears of one input (q, k and v), which a faster implementation may run as one."""
        return [self.linear(x, lin) for lin in lins]

    def embedding(self, ids: Tensor, emb: QuantizedWeight, dtype: torch.dtype) -> Tensor:
        """ids (…) → (…, C); dequantizes only the rows it gathers."""
        rows = dequantize(emb, ids.reshape(-1), dtype=dtype)
        return rows.reshape(*ids.shape, -1)

    def rope_and_store(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor
    ) -> Tensor:
        """Rotate q (N, H, D) and k (N, K, D) by RoPE; store the rotated k and v (N, K, D) at pool rows
        `slots` (N,); → the rotated q."""
        k_pool.index_copy_(0, slots, rope(k, cos, sin).to(k_pool.dtype))
        v_pool.index_copy_(0, slots, v.to(v_pool.dtype))
        return rope(q, cos, sin)

    def attention(
        self,
        q: Tensor,
        k_pool: Tensor,
        v_pool: Tensor,
        sinks: Tensor,
        batch: Batch,
        *,
        window: int | None,
        scale: float,
    ) -> Tensor:
        """Causal GQA attention with per-head sinks over each sequence's blocks; q (N, H, D) → (N, H, D).

        A query at position t sees the keys at positions j ≤ t with j > t − window. Sequence by sequence:
        only the blocks inside the first query's window are gathered.
        """
        out = torch.empty_like(q)
        offsets = torch.arange(BLOCK_TOKENS, device=q.device)
        starts = batch.host_query_start
        for s, length in enumerate(batch.host_seq_lens):
            a, b = starts[s], starts[s + 1]
            first = length - (b - a)  # position of the sequence's first query in this step
            b0 = 0 if window is None else max(0, first - window + 1) // BLOCK_TOKENS
            table = batch.block_tables[s, b0 : blocks_for(length)].long()
            rows = (table[:, None] * BLOCK_TOKENS + offsets).reshape(-1)
            k_pos = torch.arange(b0 * BLOCK_TOKENS, b0 * BLOCK_TOKENS + rows.numel(), device=q.device)
            q_pos = torch.arange(first, length, device=q.device)
            out[a:b] = attend(q[a:b], k_pool[rows], v_pool[rows], sinks, q_pos, k_pos, window=window, scale=scale)
        return out

    @partial_experts
    def moe(self, x: Tensor, mlp: MoEWeights, *, top_k: int, limit: float, alpha: float) -> Tensor:
        """Router top-k then softmax over the k, clamped SwiGLU experts, routing-weighted sum (formats.md
        §4.7 g–i); x (N, C) → (N, C)."""
        logits = self.linear(x, mlp.router)  # (N, E)
        top_v, top_i = torch.topk(logits, top_k, dim=-1)  # (N, k)
        weights = torch.softmax(top_v.float(), dim=-1).to(x.dtype)
        top_i, weights = local_experts(top_i, weights, mlp.experts, logits.shape[-1])
        if top_i.numel() <= GATHER_MAX_PAIRS:
            y = self._experts_gathered(x, mlp.experts, top_i, limit=limit, alpha=alpha)  # (N, k, C)
            return (y * weights[..., None]).sum(1)
        return self._experts_grouped(x, mlp.experts, top_i, weights, limit=limit, alpha=alpha)

    def _experts_gathered(self, x: Tensor, experts: ExpertWeights, top_i: Tensor, *, limit: float, alpha: float):
        """Each (token, expert) pair against its own gathered expert matrix: no data-dependent shape."""
        N, k = top_i.shape
        idx = top_i.reshape(-1).clamp(min=0)  # a pair for another rank's expert (weight 0) runs the first
        h = x.repeat_interleave(k, dim=0)  # (N k, C)
        gate = _gathered_linear(h, experts.gate_proj, idx).clamp(max=limit)
        up = _gathered_linear(h, experts.up_proj, idx).clamp(-limit, limit)
        act = gate * torch.sigmoid(gate * alpha) * (up + 1)
        return _gathered_linear(act, experts.down_proj, idx).view(N, k, -1)

    def _experts_grouped(
        self, x: Tensor, experts: ExpertWeights, top_i: Tensor, weights: Tensor, *, limit: float, alpha: float
    ) -> Tensor:
        """Each hit expert dequantized once for all of its tokens (reads the routing on the host)."""
        out = torch.zeros_like(x)
        for e in [e for e in torch.unique(top_i).tolist() if e >= 0]:  # −1: another rank's expert
            tok, slot = torch.where(top_i == e)
            h = x[tok]
            gate = _expert_linear(h, experts.gate_proj, e).clamp(max=limit)
            up = _expert_linear(h, experts.up_proj, e).clamp(-limit, limit)
            act = gate * torch.sigmoid(gate * alpha) * (up + 1)
            y = _expert_linear(act, experts.down_proj, e)
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out


def local_experts(top_i: Tensor, weights: Tensor, experts: ExpertWeights, num_experts: int) -> tuple[Tensor, Tensor]:
    """The routing (N, k) of a rank that holds only experts `first` … `first + n` (engine/parallel.py) →
    ids into its stack, −1 for a pair routed to another rank's expert, whose weight becomes 0: that pair's
    contribution comes from its own rank through the all-reduce. The whole stack: unchanged."""
    n = experts.down_proj.weight.shape[0]
    if n == num_experts:
        return top_i, weights
    local = top_i - experts.first
    here = (local >= 0) & (local < n)
    return torch.where(here, local, -1), weights * here


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate halves (NeoX style): x (N, heads, D), cos/sin (N, D/2) already scaled by YaRN."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def attend(
    q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, q_pos: Tensor, k_pos: Tensor, *, window: int | None, scale: float
) -> Tensor:
    """Dense sink attention of one sequence: q (T, H, D), k/v (S, K, D) at positions q_pos (T,), k_pos (S,).
    The sink S_h only enlarges the softmax denominator (formats.md §4.7e). Returns (T, H, D) in q's dtype."""
    H = q.shape[1]
    rep = H // k.shape[1]
    qh = q.float().transpose(0, 1)  # (H, T, D)
    kh = k.float().repeat_interleave(rep, dim=1).transpose(0, 1)  # (H, S, D)
    vh = v.float().repeat_interleave(rep, dim=1).transpose(0, 1)
    visible = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    scores = (qh @ kh.transpose(1, 2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.float().reshape(H, 1, 1).expand(H, q.shape[0], 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return (probs @ vh).transpose(0, 1).to(q.dtype)


def _expert_linear(x: Tensor, lin: QuantizedWeight, expert: int) -> Tensor:
    return F.linear(x, dequantize(lin, expert, dtype=x.dtype), None if lin.bias is None else lin.bias[expert])


def _gathered_linear(x: Tensor, lin: QuantizedWeight, idx: Tensor) -> Tensor:
    """x (P, in), idx (P,) expert ids → (P, out): row p through expert idx[p]."""
    w = dequantize(lin, idx, dtype=x.dtype)  # (P, out, in)
    y = torch.bmm(w, x[:, :, None])[..., 0]
    return y if lin.bias is None else y + lin.bias[idx]


# name → "module:class", imported only when asked for (the Triton kernels need triton and a GPU).
OPS = {
    "torch": "ossq.engine.ops:TorchOps",
    "cpu": "ossq.engine.cpu_ops:CpuOps",
    "triton": "ossq.engine.triton.ops:TritonOps",
}


def default_ops(device: torch.device) -> str:
    """The implementation a device runs when none is named: the CPU re-lays quantized weights (engine/
    cpu_ops.py; in float32 its outputs equal TorchOps's to rounding), CUDA runs the Triton kernels where
    Triton is installed, anything else the reference."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


def select_ops(name: str | None = None, device: torch.device | None = None) -> Ops:
    """The implementation called `name` (None: `default_ops(device)`), as a fresh instance."""
    name = name or default_ops(device or torch.device("cpu"))
    if name not in OPS:
        raise OssqError(f"unknown ops {name!r}; available: {', '.join(OPS)}")
    module, cls = OPS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as e:
        raise OssqError(f"ops {name!r} are not available here: {e}") from None
