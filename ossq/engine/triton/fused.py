"""The small operations between the matmuls, one launch each: residual add + RMSNorm, RoPE of q and k
with the KV write, and the router's top-k + softmax (formats.md §4.7 b, d, g).

In plain torch each of these is five to fifteen kernels of a few microseconds; in a decode step of one
token they would outnumber the matmuls ten to one. Each kernel here rounds where the torch reference
(engine/ops.py, TorchOps) rounds, so it differs from the reference only by the order of float32 sums:
the residual sum is rounded to the activation dtype before it is normed, and each product and sum of
the rotation is rounded as torch's bfloat16 arithmetic rounds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ossq.engine.triton.launch import launch_args, wait_for_inputs


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, C, eps, stride_x, stride_d, HAS_DELTA: tl.constexpr,
                     BLOCK_C: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One row: s = x (+ delta), rounded to x's dtype; out = weight · s / rms(s)."""
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    s = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0)
        s = (s.to(tl.float32) + d.to(tl.float32)).to(s.dtype)
        tl.store(sum_ptr + row * C + offs, s, mask=mask)
    h = s.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, 0) / C + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + row * C + offs, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x (N, C) (+ delta (N, C)) → (the sum, its RMSNorm), both in x's dtype; without delta the sum is x."""
    N, C = x.shape
    assert x.stride(1) == 1 and (delta is None or (delta.shape == x.shape and delta.stride(1) == 1))
    out = torch.empty(N, C, dtype=x.dtype, device=x.device)
    total = x if delta is None else torch.empty_like(out)
    if N:
        d = x if delta is None else delta
        _rms_norm_kernel[(N,)](x, d, weight, total, out, C, float(eps), x.stride(0), d.stride(0),
                               HAS_DELTA=delta is not None, BLOCK_C=triton.next_power_of_2(C),
                               **launch_args(x.device))  # fmt: skip
    return total, out


@triton.jit
def _rotate(x_ptr, c, s, offs_h, offs_d, h_mask, HALF: tl.constexpr):
    """(heads, HALF) halves of one token's heads, rotated NeoX style with torch's roundings."""
    ptr = x_ptr + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    x1 = tl.load(ptr, mask=h_mask[:, None], other=0)
    x2 = tl.load(ptr + HALF, mask=h_mask[:, None], other=0)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    a = (f1 * c).to(dt).to(tl.float32) - (f2 * s).to(dt).to(tl.float32)
    b = (f2 * c).to(dt).to(tl.float32) + (f1 * s).to(dt).to(tl.float32)
    return a.to(dt), b.to(dt)


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, q_out, k_pool, v_pool, stride_q,
                       stride_k, stride_v, stride_pool, H: tl.constexpr, K: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One token: rotated q to q_out; rotated k and v to pool row slots[token]."""
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    c = tl.load(cos_ptr + t * HALF + offs_d).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * HALF + offs_d).to(tl.float32)[None, :]
    offs_h = tl.arange(0, BLOCK_H)
    a, b = _rotate(q_ptr + t * stride_q, c, s, offs_h, offs_d, offs_h < H, HALF)
    out = q_out + t * H * 2 * HALF + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(out, a, mask=(offs_h < H)[:, None])
    tl.store(out + HALF, b, mask=(offs_h < H)[:, None])
    slot = tl.load(slots_ptr + t)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = (offs_k < K)[:, None]
    a, b = _rotate(k_ptr + t * stride_k, c, s, offs_k, offs_d, offs_k < K, HALF)
    row = slot * stride_pool + offs_k[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(k_pool + row, a.to(k_pool.dtype.element_ty), mask=k_mask)
    tl.store(k_pool + row + HALF, b.to(k_pool.dtype.element_ty), mask=k_mask)
    v = v_ptr + t * stride_v + offs_k[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(v_pool + row, tl.load(v, mask=k_mask, other=0).to(v_pool.dtype.element_ty), mask=k_mask)
    tl.store(v_pool + row + HALF, tl.load(v + HALF, mask=k_mask, other=0).to(v_pool.dtype.element_ty), mask=k_mask)


def rope_and_store(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor
) -> Tensor:
    """q (N, H, D), k and v (N, K, D), cos/sin (N, D/2) → rotated q (N, H, D); rotated k and v are written
    to pool rows `slots` (N,). The heads of one token must be contiguous (views of a fused qkv are)."""
    N, H, D = q.shape
    K = k.shape[1]
    half = D // 2
    for t in (q, k, v):
        assert t.stride(2) == 1 and t.stride(1) == D, "each token's heads must be contiguous"
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    assert half == triton.next_power_of_2(half), "head dim must be a power of two"
    out = torch.empty(N, H, D, dtype=q.dtype, device=q.device)
    if N:
        _rope_store_kernel[(N,)](q, k, v, cos, sin, slots, out, k_pool, v_pool, q.stride(0), k.stride(0),
                                 v.stride(0), k_pool.stride(0), H=H, K=K, HALF=half,
                                 BLOCK_H=triton.next_power_of_2(H), BLOCK_K=triton.next_power_of_2(K),
                                 **launch_args(q.device))  # fmt: skip
    return out


@triton.jit
def _top_k(vals, ids_ptr, weights_ptr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """One token's float32 router logits (BLOCK_E,), −inf past the experts → its TOP_K largest (ties to the
    lower expert id) to ids_ptr, the softmax over them to weights_ptr."""
    offs = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    top = tl.max(vals, 0)
    ids = tl.zeros((BLOCK_K,), tl.int64)
    p = tl.zeros((BLOCK_K,), tl.float32)
    for j in tl.static_range(TOP_K):
        m = tl.max(vals, 0)
        e = tl.min(tl.where(vals == m, offs, BLOCK_E), 0)
        ids = tl.where(offs_k == j, e, ids)
        p = tl.where(offs_k == j, tl.exp(m - top), p)
        vals = tl.where(offs == e, float("-inf"), vals)
    k_mask = offs_k < TOP_K
    tl.store(ids_ptr + offs_k, ids, mask=k_mask)
    tl.store(weights_ptr + offs_k, p / tl.sum(p, 0), mask=k_mask)


@triton.jit
def _route_kernel(logits_ptr, ids_ptr, weights_ptr, E, stride_l, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One token: the TOP_K largest router logits, softmax over them (_top_k)."""
    wait_for_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    vals = tl.load(logits_ptr + t * stride_l + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
    _top_k(vals, ids_ptr + t * TOP_K, weights_ptr + t * TOP_K, TOP_K, BLOCK_E, BLOCK_K)


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Router logits (N, E) → expert ids (N, k) int64, largest first, and float32 weights softmax(top-k
    logits) (N, k), in one launch (formats.md §4.7g; torch.topk's choice for distinct logits)."""
    N, E = logits.shape
    assert logits.stride(1) == 1
    ids = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    if N:
        _route_kernel[(N,)](logits, ids, weights, E, logits.stride(0), TOP_K=top_k,
                            BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k),
                            **launch_args(logits.device))  # fmt: skip
    return ids, weights
