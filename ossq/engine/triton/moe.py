"""The mixture of experts for decode-sized steps, with no host synchronisation (formats.md §4.7 g–i).

A quantized router is one launch, `route` (`_router_kernel`, grid (N, K splits)): each program takes the
router logits over one K split, and the last of a token's splits to arrive sums them (qmm's split-K
epilogue), rounds them as the router linear's output is rounded and picks the top k with their softmax
(fused.route's `_top_k`); an unquantized one is a linear, then fused.route. The router is a few rows, so
its K is the work to spread, and a token's routing is a chain of one kernel instead of two. Two kernels
then read only the selected experts' packed bytes, indexing the expert stacks with the device-side ids:

- `_gate_up_kernel`, grid (I tiles, N·k pairs): for pair (token t, expert e) the gate and up rows of
  expert e times x[t] in one K loop (x loaded and rounded once a step for both, both matrices' next words
  in flight together: the one-token step is bound by loads in flight, not bytes), biases added, then the
  clamped SwiGLU `min(g, limit)·σ(alpha·min(g, limit))·(clamp(u, −limit, limit) + 1)` → act (N·k, I)
  float32;
- `_down_kernel`, grid (C tiles, N·k pairs): the pair's down rows times its act row, plus the down bias,
  times the routing weight, written as one of the token's k float32 partials; the last of the token's
  pairs to finish a tile sums the k partials in slot order (qmm's split-K epilogue) and writes the output
  once, in x's dtype. One program per pair rather than per token gives the GPU k times the programs.

Each pair reads its own expert's matrices (as TorchOps' gathered path does), which is right while pairs
are few (decode); larger steps take `grouped_experts`.

`grouped_experts` (batched decode of many sequences, prefill) reads each hit expert's packed weights once
per BLOCK_M of its pairs rather than once per pair. The N·k pairs are sorted by expert on the device (a
stable sort; each expert's bounds by binary search) and each expert's segment is padded to a multiple of
BLOCK_M: `pairs` holds the pair ids in that order (N·k where padding) and `block_expert` each block's
expert (E past the last segment). Both have a static length, N·k // BLOCK_M + min(E, N·k) blocks (each hit
expert adds at most one partial block), so no shape depends on the routing and nothing is read back to the
host: the step can be captured in a CUDA graph. Three kernels:

- `_grouped_gate_up_kernel`, grid (I tiles, blocks): the block's rows of x times the expert's gate and up
  tiles, decoded in registers as qmm's `_qmm_kernel` does and fed to `tl.dot`, biases added, the clamped
  SwiGLU → act (N·k, I) at the pair rows, in x's dtype: the down product's `tl.dot` operand (half the bytes
  of float32 in bfloat16), rounded where TorchOps rounds its act;
- `_grouped_down_kernel`, grid (C tiles, blocks): the block's act rows times the expert's down tile, plus
  the down bias, times the pair's routing weight → y (N·k, C) float32 at the pair rows;
- `_sum_pairs_kernel`, grid (N, C tiles): each token's k rows of y summed in slot order, in x's dtype.

Blocks past the last segment do nothing. There are no atomics and no sum whose order depends on the
routing, so for given tiles a token's output has the same bits whatever the other tokens of the step are
(they only fill other rows of the `tl.dot` tiles); the default BLOCK_M grows with the step (`grouped_tiles`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ossq.engine.triton.fused import _top_k
from ossq.engine.triton.launch import launch_args, wait_for_inputs
from ossq.engine.triton.qmm import (
    TICKETS,
    _epilogue,
    _row_matvec,
    _row_matvecs,
    _split_sum,
    _step,
    _tickets,
    check_layout,
    int_dot_mode,
)


@triton.jit
def _router_kernel(x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, ids_ptr, weights_ptr, part_ptr, ticket_ptr, T, E, K,
                   k_per_split, stride_xm, stride_wn, stride_sn, TOP_K: tl.constexpr, BITS: tl.constexpr,
                   G: tl.constexpr, MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_TOP: tl.constexpr, MAGIC: tl.constexpr, INT_DOT: tl.constexpr,
                   PDL: tl.constexpr):  # fmt: skip
    """Grid (T tokens, K splits): one token's logits over one K split; the token's last split to arrive
    adds the bias, rounds the logits to x's dtype (the router linear's output) and routes them."""
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    sp = tl.program_id(1)
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    k_start = sp * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = _row_matvec(x_ptr + t.to(tl.int64) * stride_xm, w_ptr, s_ptr, b_ptr, offs_e, e_mask, k_start, k_end,
                      stride_wn, stride_sn, BITS, G, MXFP4, BLOCK_E, BLOCK_K, MAGIC, INT_DOT)  # fmt: skip
    last, logits = _split_sum(acc, t * E + offs_e, e_mask, part_ptr, ticket_ptr, t, sp, tl.num_programs(1), T * E)
    if last:
        if HAS_BIAS:
            logits += tl.load(bias_ptr + offs_e, mask=e_mask, other=0).to(tl.float32)
        logits = tl.where(e_mask, logits.to(x_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
        _top_k(logits, ids_ptr + t * TOP_K, weights_ptr + t * TOP_K, TOP_K, BLOCK_E, BLOCK_TOP)


def route(x: Tensor, router, top_k: int, *, block_k: int = 256, int_dot: bool | None = None) -> tuple[Tensor, Tensor]:
    """x (N, C), a quantized router (E, C) → expert ids (N, k) int64, largest logit first, and float32
    routing weights (N, k): fused.route of the router linear's logits, in one launch of N × C/block_k
    programs. `int_dot` as qmm.Tiles'."""
    x = x.contiguous()
    N, C = x.shape
    E = router.weight.shape[0]
    spec = router.spec
    assert N <= TICKETS, "one arrival counter per token"
    ids = torch.empty(N, top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(N, top_k, dtype=torch.float32, device=x.device)
    bk = max(min(block_k, triton.next_power_of_2(C)), spec.group_size)
    splits = triton.cdiv(C, bk)
    part = torch.empty(splits, N, E, dtype=torch.float32, device=x.device)
    w, scales, biases, bias = _weight_args(router, C)
    _router_kernel[(N, splits)](
        x, w, scales, biases, bias, ids, weights, part, _tickets(x.device), N, E, C, bk, x.stride(0),
        w.stride(0), scales.stride(0), TOP_K=top_k, BITS=spec.bits, G=spec.group_size,
        MXFP4=spec.mode == "mxfp4", HAS_BIAS=router.bias is not None, BLOCK_E=triton.next_power_of_2(E),
        BLOCK_K=bk, BLOCK_TOP=triton.next_power_of_2(top_k), MAGIC=True,
        INT_DOT=int_dot_mode(int_dot, x.dtype, spec, x.device), **launch_args(x.device),
    )  # fmt: skip
    return ids, weights


@triton.jit
def _gate_up_kernel(x_ptr, idx_ptr, gw, gs, gb, gbias, uw, us, ub, ubias, act_ptr, I, K, limit, alpha,
                    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_bias_e, TOP_K: tl.constexpr,
                    BITS: tl.constexpr, G: tl.constexpr, MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr, INT_DOT: tl.constexpr,
                    PDL: tl.constexpr):  # fmt: skip
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pair = tl.program_id(1)
    expert = tl.load(idx_ptr + pair).to(tl.int64)
    if expert >= 0:  # −1: another rank's expert (tensor parallel), whose act row nothing reads
        x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < I
        w_off, s_off = expert * stride_we, expert * stride_se
        g, u = _row_matvecs(x_row, gw + w_off, gs + s_off, gb + s_off, uw + w_off, us + s_off, ub + s_off, offs_n,
                            n_mask, 0, K, stride_wn, stride_sn, BITS, G, MXFP4, BLOCK_N, BLOCK_K, MAGIC, INT_DOT,
                            True)  # fmt: skip
        if HAS_BIAS:
            g += tl.load(gbias + expert * stride_bias_e + offs_n, mask=n_mask, other=0).to(tl.float32)
            u += tl.load(ubias + expert * stride_bias_e + offs_n, mask=n_mask, other=0).to(tl.float32)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        act = g * tl.sigmoid(alpha * g) * (u + 1)
        tl.store(act_ptr + pair.to(tl.int64) * I + offs_n, act, mask=n_mask)


@triton.jit
def _down_kernel(act_ptr, idx_ptr, route_ptr, dw, ds, db, dbias, out_ptr, part_ptr, ticket_ptr, T, C, I, stride_we,
                 stride_wn, stride_se, stride_sn, stride_bias_e, stride_om, TOP_K: tl.constexpr, BITS: tl.constexpr,
                 G: tl.constexpr, MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, MAGIC: tl.constexpr, INT_DOT: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Grid (C tiles, T·k pairs): one pair's down rows times its act row, plus the bias, times the routing
    weight, as the k-th split of the token's output tile (qmm's split-K epilogue: the last of the token's
    pairs to arrive sums the k partials in slot order)."""
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    pair = tl.program_id(1)
    token = pair // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    expert = tl.load(idx_ptr + pair).to(tl.int64)
    y = tl.zeros((BLOCK_N,), tl.float32)
    if expert >= 0:  # −1: another rank's expert, which adds nothing (but still takes its ticket)
        w_off, s_off = expert * stride_we, expert * stride_se
        y = _row_matvec(act_ptr + pair.to(tl.int64) * I, dw + w_off, ds + s_off, db + s_off, offs_n, n_mask, 0, I,
                        stride_wn, stride_sn, BITS, G, MXFP4, BLOCK_N, BLOCK_K, MAGIC, INT_DOT)  # fmt: skip
        if HAS_BIAS:
            y += tl.load(dbias + expert * stride_bias_e + offs_n, mask=n_mask, other=0).to(tl.float32)
        y *= tl.load(route_ptr + pair)
    offs_m = token + tl.arange(0, 1)
    _epilogue(y[None, :], offs_m, offs_n, n_mask[None, :], out_ptr, part_ptr, ticket_ptr, out_ptr,
              token * tl.num_programs(0) + pid_n, pair % TOP_K, TOP_K, T, C, stride_om, False, False)  # fmt: skip


def _weight_args(lin, k: int) -> tuple:
    """(weight, scales, biases, bias) pointers of a quantized linear or expert stack of K-wide rows,
    placeholders where absent."""
    check_layout(lin.weight, lin.scales, lin.biases, lin.spec, k)
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
    int_dot: bool | None = None,
) -> Tensor:
    """x (N, C), expert ids top_i (N, k), routing weights route (N, k) → Σ_j route[:, j]·expert_j(x), (N, C)
    in x's dtype. `experts` holds gate_proj/up_proj (E, I, C) and down_proj (E, C, I) stacks, gate and up
    stored alike. A pair of expert id −1 (another rank's expert, tensor parallel) adds nothing. `int_dot`
    as qmm.Tiles' (the float32 act between the kernels counts as x's dtype: TorchOps rounds it to it)."""
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    assert gate.spec == up.spec and (gate.bias is None) == (up.bias is None)
    x = x.contiguous()
    N, C = x.shape
    k = top_i.shape[1]
    I = gate.weight.shape[1]
    idx = top_i.reshape(-1).contiguous()
    route = route.reshape(-1).float().contiguous()
    act = torch.empty(N * k, I, dtype=torch.float32, device=x.device)
    gw, gs, gb, gbias = _weight_args(gate, C)
    uw, us, ub, ubias = _weight_args(up, C)
    bk = max(min(block_k, triton.next_power_of_2(C)), gate.spec.group_size)  # no K step longer than the row
    _gate_up_kernel[(triton.cdiv(I, block_n), N * k)](
        x, idx, gw, gs, gb, gbias, uw, us, ub, ubias, act, I, C, float(limit), float(alpha),
        x.stride(0), gw.stride(0), gw.stride(1), gs.stride(0), gs.stride(1), gbias.stride(0),
        TOP_K=k, BITS=gate.spec.bits, G=gate.spec.group_size, MXFP4=gate.spec.mode == "mxfp4",
        HAS_BIAS=gate.bias is not None, BLOCK_N=block_n, BLOCK_K=bk, MAGIC=magic,
        INT_DOT=int_dot_mode(int_dot, x.dtype, gate.spec, x.device), num_warps=num_warps, **launch_args(x.device),
    )  # fmt: skip
    out = torch.empty_like(x)
    dw, ds, db, dbias = _weight_args(down, I)
    bk = max(min(block_k, triton.next_power_of_2(I)), down.spec.group_size)
    c_tiles = triton.cdiv(C, block_n)
    assert N * c_tiles <= TICKETS, "a decode-sized step: its output tiles need an arrival counter each"
    part = torch.empty(k, N, C, dtype=torch.float32, device=x.device)
    _down_kernel[(c_tiles, N * k)](
        act, idx, route, dw, ds, db, dbias, out, part, _tickets(x.device), N, C, I, dw.stride(0), dw.stride(1),
        ds.stride(0), ds.stride(1), dbias.stride(0), out.stride(0),
        TOP_K=k, BITS=down.spec.bits, G=down.spec.group_size, MXFP4=down.spec.mode == "mxfp4",
        HAS_BIAS=down.bias is not None, BLOCK_N=block_n, BLOCK_K=bk, MAGIC=magic,
        INT_DOT=int_dot_mode(int_dot, x.dtype, down.spec, x.device), num_warps=num_warps, **launch_args(x.device),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------- grouped experts


@triton.jit
def _rows(ptr, rows, m_mask, k0, K, BLOCK_K: tl.constexpr):
    """(BM, BLOCK_K): elements k0 … k0 + BLOCK_K of the K-wide rows `rows` at ptr, zero past K and for
    padding rows."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptr = ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :]
    return tl.load(ptr, mask=m_mask[:, None] & (offs_k < K)[None, :], other=0)


@triton.jit
def _dot_step(acc, x, w_ptr, s_ptr, b_ptr, offs_n, n_mask, k0, K, stride_wn, stride_sn, BITS: tl.constexpr,
              G: tl.constexpr, MXFP4: tl.constexpr, MAGIC: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """acc (BM, BN) + x (BM, BLOCK_K) · W[offs_n, k0 : k0 + BLOCK_K]ᵀ, the weight tile decoded in registers
    to x's dtype."""
    v, scale, bias = _step(w_ptr, s_ptr, b_ptr, offs_n, n_mask, k0, K, stride_wn, stride_sn, BITS, G, MXFP4, MAGIC,
                           BLOCK_N, BLOCK_K)  # fmt: skip
    w = tl.reshape(v * scale[:, :, None] + bias[:, :, None], (BLOCK_N, BLOCK_K))
    return tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)


@triton.jit
def _grouped_gate_up_kernel(x_ptr, pairs_ptr, block_expert_ptr, gw, gs, gb, gbias, uw, us, ub, ubias, act_ptr, P,
                            E, I, K, limit, alpha, stride_we, stride_wn, stride_se, stride_sn, stride_bias_e,
                            TOP_K: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, MXFP4: tl.constexpr,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, MAGIC: tl.constexpr, PRECISION: tl.constexpr,
                            PDL: tl.constexpr):  # fmt: skip
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    blk = tl.program_id(1)
    expert = tl.load(block_expert_ptr + blk).to(tl.int64)
    if expert < E:
        pairs = tl.load(pairs_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
        m_mask = pairs < P
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < I
        w_off, s_off = expert * stride_we, expert * stride_se
        g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _rows(x_ptr, pairs // TOP_K, m_mask, k0, K, BLOCK_K)
            g = _dot_step(g, x, gw + w_off, gs + s_off, gb + s_off, offs_n, n_mask, k0, K, stride_wn, stride_sn,
                          BITS, G, MXFP4, MAGIC, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
            u = _dot_step(u, x, uw + w_off, us + s_off, ub + s_off, offs_n, n_mask, k0, K, stride_wn, stride_sn,
                          BITS, G, MXFP4, MAGIC, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
        if HAS_BIAS:
            g += tl.load(gbias + expert * stride_bias_e + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
            u += tl.load(ubias + expert * stride_bias_e + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        act = g * tl.sigmoid(alpha * g) * (u + 1)
        ptr = act_ptr + pairs[:, None].to(tl.int64) * I + offs_n[None, :]
        tl.store(ptr, act.to(act_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _grouped_down_kernel(act_ptr, pairs_ptr, block_expert_ptr, route_ptr, dw, ds, db, dbias, y_ptr, P, E, C, I,
                         stride_we, stride_wn, stride_se, stride_sn, stride_bias_e, BITS: tl.constexpr,
                         G: tl.constexpr, MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr,
                         PRECISION: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    blk = tl.program_id(1)
    expert = tl.load(block_expert_ptr + blk).to(tl.int64)
    if expert < E:
        pairs = tl.load(pairs_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
        m_mask = pairs < P
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < C
        w_off, s_off = expert * stride_we, expert * stride_se
        y = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, I, BLOCK_K):
            a = _rows(act_ptr, pairs, m_mask, k0, I, BLOCK_K)
            y = _dot_step(y, a, dw + w_off, ds + s_off, db + s_off, offs_n, n_mask, k0, I, stride_wn, stride_sn,
                          BITS, G, MXFP4, MAGIC, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
        if HAS_BIAS:
            y += tl.load(dbias + expert * stride_bias_e + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        y *= tl.load(route_ptr + pairs, mask=m_mask, other=0)[:, None]
        ptr = y_ptr + pairs[:, None].to(tl.int64) * C + offs_n[None, :]
        tl.store(ptr, y, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_pairs_kernel(y_ptr, out_ptr, C, TOP_K: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """out[t] = Σ_j y[t·k + j], j in order, summed in float32."""
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < C
    out = tl.zeros((BLOCK_C,), tl.float32)
    for j in tl.static_range(TOP_K):
        out += tl.load(y_ptr + (token * TOP_K + j) * C + offs, mask=mask, other=0)
    tl.store(out_ptr + token * C + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def sort_pairs(top_i: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Expert ids top_i (N, k) → (pairs, block_expert): the pair ids t·k + j grouped by expert, each expert's
    segment padded to a multiple of block_m with the sentinel N·k, (blocks·block_m,) int32; and each block's
    expert, num_experts past the last segment, (blocks,) int64 — blocks = N·k // block_m + min(E, N·k), all
    on the device. A pair of expert id −1 (another rank's expert, tensor parallel) is in no segment."""
    P = top_i.numel()
    device = top_i.device
    ids = top_i.reshape(-1)
    ids = torch.where(ids < 0, num_experts, ids)  # left out: sorted after every segment
    ids_sorted, order = torch.sort(ids, stable=True)
    bounds = torch.searchsorted(ids_sorted, torch.arange(num_experts + 1, device=device, dtype=ids.dtype))
    padded = (bounds[1:] - bounds[:-1] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    shift = padded_end - padded - bounds[:-1]  # each expert's padded start minus its sorted start
    blocks = P // block_m + min(num_experts, P)
    pairs = torch.full((blocks * block_m + 1,), P, dtype=torch.int32, device=device)  # + a slot for the left out
    shifted = torch.arange(P, device=device) + shift.index_select(0, ids_sorted.clamp(max=num_experts - 1))
    dest = torch.where(ids_sorted < num_experts, shifted, blocks * block_m)
    pairs.scatter_(0, dest, order.to(torch.int32))
    pairs = pairs[:-1]
    starts = torch.arange(0, blocks * block_m, block_m, device=device)
    return pairs, torch.searchsorted(padded_end, starts, right=True)


def grouped_tiles(
    tokens: int, top_k: int, num_experts: int, group_size: int, straddle: bool = False
) -> tuple[int, int, int]:
    """Default (block_m, block_n, block_k): 64-row tiles once the average expert has 64 pairs (prefill), 16
    below (batched decode); 64 outputs; K steps of two 64-wide (or group-wide) chunks, one when codes
    straddle words (bits 3, 5, 6: their decode needs more shared memory than the H200 has for two)."""
    block_m = 64 if tokens * top_k >= 64 * num_experts else 16
    return block_m, 64, (1 if straddle else 2) * max(64, group_size)


def grouped_experts(
    x: Tensor,
    experts,
    top_i: Tensor,
    route: Tensor,
    *,
    limit: float,
    alpha: float,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    magic: bool = True,
    partial: bool = False,
) -> Tensor:
    """x (N, C), expert ids top_i (N, k), routing weights route (N, k) → Σ_j route[:, j]·expert_j(x), (N, C)
    in x's dtype, as `experts` but with the pairs grouped by expert (see the module docstring); tiles left
    None take `grouped_tiles`. `partial`: ids may be −1 (another rank's expert), whose pairs add nothing."""
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    assert gate.spec == up.spec and (gate.bias is None) == (up.bias is None)
    x = x.contiguous()
    N, C = x.shape
    E, I = gate.weight.shape[:2]
    k = top_i.shape[1]
    straddle = any(32 % spec.bits for spec in (gate.spec, down.spec))
    bm, bn, bk = grouped_tiles(N, k, E, max(gate.spec.group_size, down.spec.group_size), straddle)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    assert bm >= 16 and bn >= 16, "tl.dot tiles are at least 16 × 16"
    pairs, block_expert = sort_pairs(top_i, E, bm)
    grid = (block_expert.numel(),)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    route = route.reshape(-1).float().contiguous()
    act = torch.empty(N * k, I, dtype=x.dtype, device=x.device)
    gw, gs, gb, gbias = _weight_args(gate, C)
    uw, us, ub, ubias = _weight_args(up, C)
    step = max(min(bk, triton.next_power_of_2(C)), gate.spec.group_size)  # no K step longer than the row
    _grouped_gate_up_kernel[(triton.cdiv(I, bn), *grid)](
        x, pairs, block_expert, gw, gs, gb, gbias, uw, us, ub, ubias, act, N * k, E, I, C, float(limit),
        float(alpha), gw.stride(0), gw.stride(1), gs.stride(0), gs.stride(1), gbias.stride(0),
        TOP_K=k, BITS=gate.spec.bits, G=gate.spec.group_size, MXFP4=gate.spec.mode == "mxfp4",
        HAS_BIAS=gate.bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=step, MAGIC=magic, PRECISION=precision,
        num_warps=num_warps,
        **launch_args(x.device),
        num_stages=1 if straddle else 2,
    )  # fmt: skip
    y = (torch.zeros if partial else torch.empty)(N * k, C, dtype=torch.float32, device=x.device)  # −1: no write
    dw, ds, db, dbias = _weight_args(down, I)
    step = max(min(bk, triton.next_power_of_2(I)), down.spec.group_size)
    _grouped_down_kernel[(triton.cdiv(C, bn), *grid)](
        act, pairs, block_expert, route, dw, ds, db, dbias, y, N * k, E, C, I, dw.stride(0), dw.stride(1),
        ds.stride(0), ds.stride(1), dbias.stride(0),
        BITS=down.spec.bits, G=down.spec.group_size, MXFP4=down.spec.mode == "mxfp4",
        HAS_BIAS=down.bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=step, MAGIC=magic, PRECISION=precision,
        num_warps=num_warps,
        **launch_args(x.device),
        num_stages=1 if straddle else 2,
    )  # fmt: skip
    out = torch.empty_like(x)
    block_c = min(1024, triton.next_power_of_2(C))
    _sum_pairs_kernel[(N, triton.cdiv(C, block_c))](y, out, C, TOP_K=k, BLOCK_C=block_c, **launch_args(x.device))
    return out
