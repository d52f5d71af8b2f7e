"""`TritonOps`: the ops interface with Triton kernels where they exist, TorchOps (its tested twin) elsewhere.

What runs where, per op:
- `linear`: quantized weights → qmm.qmm, decoded from the stored layout (GEMV-shaped for a few rows,
  tensor-core tiles for more); unquantized weights → TorchOps (cuBLAS via F.linear).
- `linears` (q, k, v): one qmm over the three weights, concatenated once by `prepare`.
- `moe`: quantized experts → the routing (up to MOE_MAX_PAIRS (token, expert) pairs and a quantized
  router: moe.route, the router GEMV with top-k and softmax in one launch; else the router linear, then
  fused.route), then up to MOE_MAX_PAIRS pairs moe.experts (each pair reads its expert, GEMV-shaped), beyond it
  moe.grouped_experts (tokens sorted by expert on the device, each expert read once per tile of its
  tokens): all on the device, no host sync at any size. Unquantized experts → TorchOps.
- `attention`: one query token per sequence (a pure decode step) → attention.decode over the pool;
  any prefill chunk in the step → prefill.prefill, flash style over the same pool.
- `rms_norm`, `add_rms_norm`, `rope_and_store` → fused.py, one launch each; a quantized embedding →
  qmm.dequantize_rows, one launch that decodes the gathered rows (TorchOps' unpack is some twenty kernels).

Codes of 3, 5 or 6 bits straddle the 32-bit words they are packed in, and decoding them costs the GEMV
most of its speed. Where the GPU has the memory to spare, `prepare` re-packs them at 4 or 8 bits (the same
codes, scales and biases, so every output is the same) and reads the wider words at the speed of the
aligned widths: 3-bit weights then take a third more memory, 5- and 6-bit ones 60 and 33 % more.
OSSQ_RELAYOUT=0 keeps the stored widths.

Decode steps of any size (up to GRAPH_TOKENS) never synchronise and launch the same kernels whatever the
lengths, so engine/graphs.py captures them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ossq.config import ModelConfig
from ossq.engine.batch import Batch
from ossq.engine.ops import GATHER_MAX_PAIRS, MoEWeights, QuantizedWeight, TorchOps, local_experts, partial_experts
from ossq.engine.triton import attention, fused, moe, prefill, qmm
from ossq.quant import affine
from ossq.quant.spec import QuantSpec

MOE_MAX_PAIRS = GATHER_MAX_PAIRS
GRAPH_TOKENS = 512
ALIGNED_BITS = {3: 4, 5: 8, 6: 8}  # straddling width → the aligned width prepare re-packs it at
RELAYOUT_ENV = "OSSQ_RELAYOUT"
RELAYOUT_SPARE_BYTES = 4 << 30  # free memory kept for the KV cache and activations


@dataclass
class FusedWeight:
    """Linears of one input stored as one (their rows stacked), with where each one's outputs end."""

    spec: QuantSpec | None
    weight: Tensor
    scales: Tensor | None
    biases: Tensor | None
    bias: Tensor | None
    sizes: tuple[int, ...]


class TritonOps(TorchOps):
    name = "triton"

    def __init__(self) -> None:
        self._fused: dict[tuple[int, ...], FusedWeight] = {}

    def prepare(self, model: torch.nn.Module) -> None:
        """Re-pack straddling code widths where memory allows (module docstring), then stack each
        attention's q, k and v weights into one; the three modules keep views of it, so the weights are
        held once."""
        relayout(model)
        for module in model.modules():
            projections = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj")]
            if None not in projections:
                fused = _stack(projections)
                if fused is not None:
                    self._fused[tuple(map(id, projections))] = fused

    def graph_tokens(self, config: ModelConfig) -> int:
        return GRAPH_TOKENS

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return fused.rms_norm(x, weight, eps)[1]

    def add_rms_norm(self, x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return fused.rms_norm(x, weight, eps, delta)

    def embedding(self, ids: Tensor, emb: QuantizedWeight, dtype: torch.dtype) -> Tensor:
        if emb.spec is None:
            return super().embedding(ids, emb, dtype)
        rows = qmm.dequantize_rows(ids.reshape(-1), emb.weight, emb.scales, emb.biases, emb.spec, dtype)
        return rows.reshape(*ids.shape, -1)

    def linear(self, x: Tensor, lin: QuantizedWeight) -> Tensor:
        """(…, in) → (…, out), y = x Wᵀ + b."""
        rows = x.numel() // x.shape[-1]
        if lin.spec is None or rows == 0:
            return super().linear(x, lin)
        y = qmm.qmm(x.reshape(rows, -1), lin.weight, lin.scales, lin.biases, lin.bias, lin.spec)
        return y.view(*x.shape[:-1], -1)

    def linears(self, x: Tensor, lins: Sequence[QuantizedWeight]) -> list[Tensor]:
        fused_weight = self._fused.get(tuple(map(id, lins)))
        if fused_weight is None:
            return super().linears(x, lins)
        return list(self.linear(x, fused_weight).split(fused_weight.sizes, dim=-1))

    def rope_and_store(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor
    ) -> Tensor:
        return fused.rope_and_store(q, k, v, cos, sin, k_pool, v_pool, slots)

    @partial_experts
    def moe(self, x: Tensor, mlp: MoEWeights, *, top_k: int, limit: float, alpha: float) -> Tensor:
        e = mlp.experts
        specs = (e.gate_proj.spec, e.up_proj.spec, e.down_proj.spec)
        if None in specs or specs[0] != specs[1] or x.shape[0] == 0:
            return super().moe(x, mlp, top_k=top_k, limit=limit, alpha=alpha)
        few = x.shape[0] * top_k <= MOE_MAX_PAIRS
        if few and mlp.router.spec is not None:
            top_i, weights = moe.route(x, mlp.router, top_k)  # (N, k) each, on the device, one launch
        else:
            top_i, weights = fused.route(self.linear(x, mlp.router), top_k)
        num_experts = mlp.router.weight.shape[0]
        top_i, weights = local_experts(top_i, weights, e, num_experts)  # −1: another rank's expert
        if few:
            return moe.experts(x, e, top_i, weights, limit=limit, alpha=alpha)
        partial = e.down_proj.weight.shape[0] != num_experts
        return moe.grouped_experts(x, e, top_i, weights, limit=limit, alpha=alpha, partial=partial)

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
        if q.shape[0] != batch.num_seqs:  # some sequence has a prefill chunk in this step
            return prefill.prefill(q, k_pool, v_pool, sinks, batch, window=window, scale=scale)
        return attention.decode(q, k_pool, v_pool, sinks, batch, window=window, scale=scale)


def relayout(model: torch.nn.Module, free_bytes: int | None = None) -> bool:
    """Re-pack every affine weight of 3, 5 or 6 bits at ALIGNED_BITS, in place, if the device has the
    extra bytes (plus RELAYOUT_SPARE_BYTES) free — `free_bytes`, or what CUDA reports; never on a CPU
    unless `free_bytes` is given. → whether it did."""
    lins = [m for m in model.modules() if isinstance(getattr(m, "spec", None), QuantSpec)]
    lins = [m for m in lins if m.spec.mode == "affine" and m.spec.bits in ALIGNED_BITS]
    if not lins or os.environ.get(RELAYOUT_ENV, "1") == "0":
        return False
    device = lins[0].weight.device
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    extra = sum(m.weight.nbytes * (ALIGNED_BITS[m.spec.bits] / m.spec.bits - 1) for m in lins)
    if free_bytes < extra + RELAYOUT_SPARE_BYTES:
        return False
    for m in lins:
        bits = ALIGNED_BITS[m.spec.bits]
        words = m.weight.reshape(-1, m.weight.shape[-1])
        out = torch.empty(words.shape[0], words.shape[1] * bits // m.spec.bits, dtype=torch.int32, device=device)
        step = max(1, (1 << 24) // words.shape[1])  # rows per chunk: bounds unpack's int64 temporaries
        for r in range(0, words.shape[0], step):  # int32 views: CUDA does not copy uint32
            out[r : r + step] = affine.pack(affine.unpack(words[r : r + step], m.spec.bits), bits).view(torch.int32)
        m.weight = out.view(torch.uint32).reshape(*m.weight.shape[:-1], -1)
        m.spec = replace(m.spec, bits=bits)
    return True


def _stack(lins: list[QuantizedWeight]) -> FusedWeight | None:
    """The linears' rows as one weight, the originals re-pointed at views of it; None when they are
    stored differently (then each runs alone)."""
    first = lins[0]
    if any(lin.spec != first.spec or (lin.bias is None) != (first.bias is None) for lin in lins):
        return None
    names = ("weight", "scales", "biases", "bias")
    stacked = {}
    for name in names:
        parts = [getattr(lin, name) for lin in lins]
        if parts[0] is None:
            stacked[name] = None
            continue
        raw = [p.view(torch.int32) if p.dtype == torch.uint32 else p for p in parts]  # CUDA cannot cat uint32
        whole = torch.cat(raw)
        stacked[name] = whole.view(torch.uint32) if parts[0].dtype == torch.uint32 else whole
        start = 0
        for lin, part in zip(lins, parts, strict=True):
            setattr(lin, name, stacked[name][start : start + part.shape[0]])
            start += part.shape[0]
    sizes = tuple(lin.weight.shape[0] for lin in lins)
    return FusedWeight(first.spec, stacked["weight"], stacked["scales"], stacked["biases"], stacked["bias"], sizes)
