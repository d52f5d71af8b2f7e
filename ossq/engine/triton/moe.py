"""The mixture of experts for decode-sized steps, with no host synchronisation (formats.md §4.7 g–i).

The router runs as a linear (quantized GEMV when quantized), top-k and the softmax over the k stay on the
device, and two kernels read only the selected experts' packed bytes, indexing the expert stacks with the
device-side expert ids:

- `_gate_up_kernel`, grid (I tiles, N·k pairs): for pair (token t, expert e) both gate and up rows of
  expert e times x[t], biases added, then the clamped SwiGLU
  `min(g, limit)·σ(alpha·min(g, limit))·(clamp(u, −limit, limit) + 1)` → act (N·k, I) float32;
- `_down_kernel`, grid (C tiles, N tokens): for each of the token's k pairs the down rows of its expert
  times act, plus the down bias, weighted by the routing weight and summed — the sum over k is fused, so
  the output is written once, in x's dtype.

Each pair reads its own expert's matrices (as TorchOps' gathered path does), which is right while pairs
are few (decode); larger steps belong to the grouped path (ossq/engine/ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ossq.engine.triton.qmm import _row_matvec, check_layout


@triton.jit
def _gate_up_kernel(x_ptr, idx_ptr, gw, gs, gb, gbias, uw, us, ub, ubias, act_ptr, I, K, limit, alpha,
                    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_bias_e, TOP_K: tl.constexpr,
                    BITS: tl.constexpr, G: tl.constexpr, MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pair = tl.program_id(1)
    expert = tl.load(idx_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    w_off, s_off = expert * stride_we, expert * stride_se
    g = _row_matvec(x_row, gw + w_off, gs + s_off, gb + s_off, offs_n, n_mask, 0, K, stride_wn, stride_sn,
                    BITS, G, MXFP4, BLOCK_N, BLOCK_K, MAGIC)  # fmt: skip
    u = _row_matvec(x_row, uw + w_off, us + s_off, ub + s_off, offs_n, n_mask, 0, K, stride_wn, stride_sn,
                    BITS, G, MXFP4, BLOCK_N, BLOCK_K, MAGIC)  # fmt: skip
    if HAS_BIAS:
        g += tl.load(gbias + expert * stride_bias_e + offs_n, mask=n_mask, other=0).to(tl.float32)
        u += tl.load(ubias + expert * stride_bias_e + offs_n, mask=n_mask, other=0).to(tl.float32)
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    act = g * tl.sigmoid(alpha * g) * (u + 1)
    tl.store(act_ptr + pair.to(tl.int64) * I + offs_n, act, mask=n_mask)


@triton.jit
def _down_kernel(act_ptr, idx_ptr, route_ptr, dw, ds, db, dbias, out_ptr, C, I, stride_we, stride_wn, stride_se,
                 stride_sn, stride_bias_e, stride_om, TOP_K: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                 MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 MAGIC: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    token = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    out = tl.zeros((BLOCK_N,), tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        expert = tl.load(idx_ptr + pair).to(tl.int64)
        w_off, s_off = expert * stride_we, expert * stride_se
        y = _row_matvec(act_ptr + pair.to(tl.int64) * I, dw + w_off, ds + s_off, db + s_off, offs_n, n_mask,
                        0, I, stride_wn, stride_sn, BITS, G, MXFP4, BLOCK_N, BLOCK_K, MAGIC)  # fmt: skip
        if HAS_BIAS:
            y += tl.load(dbias + expert * stride_bias_e + offs_n, mask=n_mask, other=0).to(tl.float32)
        out += tl.load(route_ptr + pair) * y
    tl.store(out_ptr + token.to(tl.int64) * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


def _stack_args(lin, k: int) -> tuple:
    """(weight, scales, biases, bias) pointers of an expert stack, placeholders where absent."""
    check_layout(lin.weight[0], lin.scales[0], None if lin.biases is None else lin.biases[0], lin.spec, k)
    w = lin.weight.view(torch.int32)
    biases = lin.scales if lin.biases is None else lin.biases
    bias = lin.scales if lin.bias is None else lin.bias
    return w, lin.scales, biases, bias


def experts(
    x: Tensor,
    experts,
    top_i: Tensor,
    route: Tensor,
    *,
    limit: float,
    alpha: float,
    block_n: int = 8,  # the fastest of benchmarks/kernels.py's sweep at one token on the H200
    block_k: int = 1024,
    num_warps: int = 4,
    magic: bool = True,
) -> Tensor:
    """x (N, C), expert ids top_i (N, k), routing weights route (N, k) → Σ_j route[:, j]·expert_j(x), (N, C)
    in x's dtype. `experts` holds gate_proj/up_proj (E, I, C) and down_proj (E, C, I) stacks, gate and up
    stored alike."""
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    assert gate.spec == up.spec and (gate.bias is None) == (up.bias is None)
    x = x.contiguous()
    N, C = x.shape
    k = top_i.shape[1]
    I = gate.weight.shape[1]
    idx = top_i.reshape(-1).contiguous()
    route = route.reshape(-1).float().contiguous()
    act = torch.empty(N * k, I, dtype=torch.float32, device=x.device)
    gw, gs, gb, gbias = _stack_args(gate, C)
    uw, us, ub, ubias = _stack_args(up, C)
    bk = max(min(block_k, triton.next_power_of_2(C)), gate.spec.group_size)  # no K step longer than the row
    _gate_up_kernel[(triton.cdiv(I, block_n), N * k)](
        x, idx, gw, gs, gb, gbias, uw, us, ub, ubias, act, I, C, float(limit), float(alpha),
        x.stride(0), gw.stride(0), gw.stride(1), gs.stride(0), gs.stride(1), gbias.stride(0),
        TOP_K=k, BITS=gate.spec.bits, G=gate.spec.group_size, MXFP4=gate.spec.mode == "mxfp4",
        HAS_BIAS=gate.bias is not None, BLOCK_N=block_n, BLOCK_K=bk, MAGIC=magic, num_warps=num_warps,
    )  # fmt: skip
    out = torch.empty_like(x)
    dw, ds, db, dbias = _stack_args(down, I)
    bk = max(min(block_k, triton.next_power_of_2(I)), down.spec.group_size)
    _down_kernel[(triton.cdiv(C, block_n), N)](
        act, idx, route, dw, ds, db, dbias, out, C, I, dw.stride(0), dw.stride(1), ds.stride(0), ds.stride(1),
        dbias.stride(0), out.stride(0),
        TOP_K=k, BITS=down.spec.bits, G=down.spec.group_size, MXFP4=down.spec.mode == "mxfp4",
        HAS_BIAS=down.bias is not None, BLOCK_N=block_n, BLOCK_K=bk, MAGIC=magic, num_warps=num_warps,
    )  # fmt: skip
    return out


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Router logits (N, E) → expert ids (N, k) and float32 weights softmax(top-k logits) (N, k), on the
    device (formats.md §4.7g)."""
    top_v, top_i = torch.topk(logits, top_k, dim=-1)
    return top_i, torch.softmax(top_v.float(), dim=-1)
