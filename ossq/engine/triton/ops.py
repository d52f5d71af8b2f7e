"""`TritonOps`: the ops interface with Triton kernels where they exist, TorchOps (its tested twin) elsewhere.

What runs where, per op:
- `linear`: quantized weights with at most GEMV_MAX_ROWS rows → qmm.qmm, decoded from the stored layout;
  unquantized weights (cuBLAS via F.linear) and larger row counts (prefill) → TorchOps.
- `moe`: quantized experts, at most MOE_MAX_PAIRS (token, expert) pairs → the router linear, top-k and
  softmax on the device, then moe.experts; otherwise TorchOps (which groups tokens by expert).
- `attention`: one query token per sequence (a pure decode step) → attention.decode over the pool;
  any prefill chunk in the step → TorchOps.
- norms, RoPE, embedding and KV writes → TorchOps for now.
"""

from __future__ import annotations

from torch import Tensor

from ossq.engine.batch import Batch
from ossq.engine.ops import GATHER_MAX_PAIRS, MoEWeights, QuantizedWeight, TorchOps
from ossq.engine.triton import attention, moe, qmm

GEMV_MAX_ROWS = 64
MOE_MAX_PAIRS = GATHER_MAX_PAIRS


class TritonOps(TorchOps):
    name = "triton"

    def linear(self, x: Tensor, lin: QuantizedWeight) -> Tensor:
        """(…, in) → (…, out), y = x Wᵀ + b."""
        rows = x.numel() // x.shape[-1]
        if lin.spec is None or rows > GEMV_MAX_ROWS or rows == 0:
            return super().linear(x, lin)
        y = qmm.qmm(x.reshape(rows, -1), lin.weight, lin.scales, lin.biases, lin.bias, lin.spec)
        return y.view(*x.shape[:-1], -1)

    def moe(self, x: Tensor, mlp: MoEWeights, *, top_k: int, limit: float, alpha: float) -> Tensor:
        e = mlp.experts
        specs = (e.gate_proj.spec, e.up_proj.spec, e.down_proj.spec)
        if x.shape[0] * top_k > MOE_MAX_PAIRS or None in specs or specs[0] != specs[1] or x.shape[0] == 0:
            return super().moe(x, mlp, top_k=top_k, limit=limit, alpha=alpha)
        top_i, weights = moe.route(self.linear(x, mlp.router), top_k)  # (N, k) each, on the device
        return moe.experts(x, e, top_i, weights, limit=limit, alpha=alpha)

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
            return super().attention(q, k_pool, v_pool, sinks, batch, window=window, scale=scale)
        return attention.decode(q, k_pool, v_pool, sinks, batch, window=window, scale=scale)
