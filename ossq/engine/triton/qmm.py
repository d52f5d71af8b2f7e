"""Quantized matmul straight from the stored MLX layout: the packed weight is streamed once and decoded in
registers, never written out dequantized.

Layouts (formats.md §1.3, §1.7; quant/affine.py, quant/mxfp4.py): a weight row of K elements is K/G groups
of G; affine codes form one LSB-first bitstream of `bits`-bit codes per row in uint32 words, element
= scale·q + bias per group (scale may be negative); MXFP4 packs E2M1 nibbles the same way as 4-bit codes
and shares one E8M0 byte per group of 32, element = E2M1[q]·2^(s−127).

A K step of BLOCK_N rows is decoded to values (rows, groups, G). For bits 2, 4, 8 (and MXFP4) each row's
words are one contiguous load and `tl.join` spreads each word's codes along in-thread axes, so no data
moves between threads; for bits 3, 5, 6 codes straddle words and each is read from its bit address (two
word loads, L1 hits). Per group the matmul is factored as `scale·Σ v·x + bias·Σ x` (formats.md §1.4), so
the weight is never scaled element by element on the one-row path. Two kernels:

- `_qmv_kernel`: up to REDUCE_MAX_ROWS rows, one program per (row, BLOCK_N outputs, K split), a
  multiply-and-reduce on the CUDA cores with the next step's loads in flight (a register double buffer);
- `_qmm_kernel`: more rows, a BLOCK_M × BLOCK_N tile with the weight dequantized in registers and fed to
  `tl.dot` (tensor cores on the GPU).

Both split K when the output alone gives too few programs to fill the GPU; the last split to finish a tile
sums the float32 partials (an arrival counter per tile), so a product is always one launch. Everything
accumulates in float32; the output has x's dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ossq.engine.triton.launch import launch_args, wait_for_inputs
from ossq.quant.spec import QuantSpec

REDUCE_MAX_ROWS = 2  # rows up to which the CUDA-core reduce kernel runs (faster there on the H200), tl.dot beyond
PROGRAMS_PER_SM = 4  # split K until the grid has about this many programs per multiprocessor


@dataclass(frozen=True)
class Tiles:
    """Launch shape of one quantized matmul: outputs per program, K per step (a multiple of G), rows per
    program on the tensor-core path, K splits (None: chosen from the grid), warps and pipeline depth."""

    block_n: int = 16
    block_k: int = 256
    block_m: int = 16
    split_k: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    magic: bool = True  # decode codes through float bits (see _values) rather than integer conversion
    int_dot: bool | None = None  # one-row path: x as int16 and integer dot products (int_dot_mode)


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _words(w_ptr, offs_n, n_mask, k0, k_end, stride_wn, BITS: tl.constexpr, G: tl.constexpr, BLOCK_K: tl.constexpr):
    """uint32 words (BN, BLOCK_K·BITS/32) holding elements k0 … k0 + BLOCK_K of rows offs_n (bits 2, 4, 8:
    whole codes per word), zero past k_end — a contiguous, vectorisable load per row.

    K, every split and every step start are multiples of G, so a group's words start at a multiple of
    G·BITS/32 words; the offsets are written so that the compiler can see it (stride and k0 rebuilt as
    multiples of it, the mask constant over each group) and load the words as 16-byte vectors."""
    P: tl.constexpr = 32 // BITS
    GW: tl.constexpr = G // P  # words per group
    offs_w = tl.arange(0, BLOCK_K // P)
    mask = n_mask[:, None] & ((k0 // G + offs_w // GW) < k_end // G)[None, :]
    row = offs_n[:, None].to(tl.int64) * ((stride_wn // GW) * GW)
    ptr = w_ptr + row + ((k0 // G) * GW + offs_w)[None, :]
    return tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _spread(w, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words (BN, W) → int32 codes (BN, BLOCK_K) in element order. Each join adds an in-thread axis
    (halves, then bytes, nibbles, pairs), so a word's codes stay in the thread that loaded it and the
    reshapes move no data."""
    W: tl.constexpr = BLOCK_K * BITS // 32
    t = tl.join(w, w >> 16)  # (BN, W, 2): element j holds bits 16j…
    t = tl.reshape(tl.join(t, t >> 8), (BLOCK_N, W, 4))  # bytes
    if BITS <= 4:
        t = tl.reshape(tl.join(t, t >> 4), (BLOCK_N, W, 8))
    if BITS <= 2:
        t = tl.reshape(tl.join(t, t >> 2), (BLOCK_N, W, 16))
    return tl.reshape(t & ((1 << BITS) - 1), (BLOCK_N, BLOCK_K)).to(tl.int32)


@triton.jit
def _gather_codes(w_ptr, offs_n, n_mask, k0, k_end, stride_wn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes (BN, BLOCK_K) for bits 3, 5, 6, where codes straddle words: each read from its bit
    address (two word loads, L1 hits)."""
    e = k0 + tl.arange(0, BLOCK_K)
    bit = e * BITS
    sh = bit & 31
    spill = sh + BITS > 32
    ptr = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (bit >> 5)[None, :]
    mask = n_mask[:, None] & (e < k_end)[None, :]
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True) >> sh.to(tl.uint32)[None, :]
    hi = tl.load(ptr + 1, mask=mask & spill[None, :], other=0).to(tl.uint32, bitcast=True)
    hi = hi << ((32 - sh) & 31).to(tl.uint32)[None, :]  # hi is 0 unless the code spills
    return ((lo | hi) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _scales(s_ptr, b_ptr, offs_n, n_mask, k0, k_end, stride_sn, G: tl.constexpr, MXFP4: tl.constexpr,
            BLOCK_K: tl.constexpr):  # fmt: skip
    """The step's raw per-group scales and biases (BN, BLOCK_K/G), as stored (zero past k_end); MXFP4
    has no biases and returns its scales twice."""
    offs_g = tl.arange(0, BLOCK_K // G)
    mask = n_mask[:, None] & (k0 + offs_g * G < k_end)[None, :]
    off = offs_n[:, None].to(tl.int64) * stride_sn + (k0 // G + offs_g)[None, :]
    s = tl.load(s_ptr + off, mask=mask, other=0)
    if MXFP4:
        b = s
    else:
        b = tl.load(b_ptr + off, mask=mask, other=0)
    return s, b


@triton.jit
def _values(codes, s, b, BITS: tl.constexpr, G: tl.constexpr, MXFP4: tl.constexpr, MAGIC: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Codes (BN, BLOCK_K) and raw scales → values v (BN, NGT, G) and float32 scale, bias (BN, NGT) with
    element = scale·v + bias.

    MAGIC builds v from float bits instead of converting integers: affine v = 1 + q/2^bits (the bits
    0x3F800000 | q << (23 − bits)), with scale·2^bits and bias − scale·2^bits per group to match; MXFP4
    v = E2M1[q]·2^−126 (sign, exponent and mantissa bits moved into place; the E2M1 subnormal lands on a
    float32 subnormal), times 2^126 again."""
    NGT: tl.constexpr = BLOCK_K // G
    codes = tl.reshape(codes, (BLOCK_N, NGT, G))
    if MXFP4:
        scale = _e8m0(s)
        if MAGIC:
            bits = ((codes & 7) << 22) | ((codes & 8) << 28)
            v = bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2^126
        else:
            e = (codes >> 1) & 3
            m = codes & 1
            twice = tl.where(e == 0, m, (2 + m) << tl.maximum(e - 1, 0))  # 2·|E2M1|: 0, 1, 2, 3, 4, 6, 8, 12
            v = tl.where((codes & 8) != 0, -twice, twice).to(tl.float32) * 0.5
        bias = tl.zeros_like(scale)
    else:
        scale = s.to(tl.float32)
        bias = b.to(tl.float32)
        if MAGIC:
            v = (0x3F800000 | (codes << (23 - BITS))).to(tl.float32, bitcast=True)
            scale = scale * (1 << BITS)
            bias = bias - scale
        else:
            v = codes.to(tl.float32)
    return v, scale, bias


@triton.jit
def _e8m0(s):
    """E8M0 bytes s → float32 2^(s−127) from their bits (s = 0: the subnormal 2^−127, as mxfp4._e8m0)."""
    s8 = s.to(tl.int32)
    return tl.where(s8 == 0, 0x00400000, s8 << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_words(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """uint32 words (BN, W) of E2M1 nibbles → float32 (BN, BLOCK_K) = E2M1·2^−126 in element order, in
    about four instructions an element (the decode bounds the one-row kernels, not the memory): each
    word is shifted left until the element's nibble is its top four bits (a join tree, as _spread, so a
    word's elements stay in its thread), which puts the sign bit in place; the exponent and mantissa
    bits move down to the float's lowest exponent bits and first mantissa bit, where E2M1's subnormal
    lands on a float32 subnormal."""
    W: tl.constexpr = BLOCK_K // 8
    t = tl.join(w << 16, w)  # element j = 4a + 2b + c needs a shift of 28 − 4j = 16(1 − a) + 8(1 − b) + 4(1 − c)
    t = tl.reshape(tl.join(t << 8, t), (BLOCK_N, W, 4))
    t = tl.reshape(tl.join(t << 4, t), (BLOCK_N, W, 8))
    bits = ((t >> 31) << 31) | ((t >> 6) & 0x01C00000)
    return tl.reshape(bits, (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_word_dot(w, s, x, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BN, NGT, G/8) float32: one K step of MXFP4 rows (words w, E8M0 scales s) times x (NGT, G), per
    word (as _word_dot), the values straight from _e2m1_words. x is taken times 2^64 so that each product
    with a value of order 2^−126 stays a normal float (full precision for any |x| above 2^−60); the sum
    gets the 2^62 back at the end of the loop (E2M1_UNSCALE)."""
    NGT: tl.constexpr = BLOCK_K // G
    v = tl.reshape(_e2m1_words(w, BLOCK_N, BLOCK_K), (BLOCK_N, NGT, G // 8, 8))
    x4 = tl.reshape(x * 1.8446744073709552e19, (NGT, G // 8, 8))  # x·2^64
    return tl.sum(v * x4[None, :, :, :], 3) * _e8m0(s)[:, :, None]


@triton.jit
def _step(w_ptr, s_ptr, b_ptr, offs_n, n_mask, k0, k_end, stride_wn, stride_sn, BITS: tl.constexpr,
          G: tl.constexpr, MXFP4: tl.constexpr, MAGIC: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):  # fmt: skip
    """One K step of rows offs_n, loaded and decoded: (v, scale, bias) as _values."""
    if 32 % BITS == 0:
        codes = _spread(_words(w_ptr, offs_n, n_mask, k0, k_end, stride_wn, BITS, G, BLOCK_K), BITS, BLOCK_N, BLOCK_K)
    else:
        codes = _gather_codes(w_ptr, offs_n, n_mask, k0, k_end, stride_wn, BITS, BLOCK_K)
    s, b = _scales(s_ptr, b_ptr, offs_n, n_mask, k0, k_end, stride_sn, G, MXFP4, BLOCK_K)
    return _values(codes, s, b, BITS, G, MXFP4, MAGIC, BLOCK_N, BLOCK_K)


@triton.jit
def _x_tile(x_ptr, k0, k_end, G: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 (NGT, G): elements k0 + g·G + j of one activation row, zero past k_end."""
    NGT: tl.constexpr = BLOCK_K // G
    offs_g = tl.arange(0, NGT)
    offs = k0 + offs_g[:, None] * G + tl.arange(0, G)[None, :]
    return tl.load(x_ptr + offs, mask=(k0 + offs_g * G < k_end)[:, None], other=0).to(tl.float32)


@triton.jit
def _row_dot(v, scale, bias, x, MXFP4: tl.constexpr):
    """(BN,) float32: Σ over the step of (scale·v + bias)·x, as scale·Σ v·x + bias·Σ x per group."""
    part = tl.sum(v * x[None, :, :], 2)  # (BN, NGT)
    acc = tl.sum(part * scale, 1)
    if not MXFP4:
        acc += tl.sum(bias * tl.sum(x, 1)[None, :], 1)
    return acc


@triton.jit
def _word_dot(v, scale, bias, x, P: tl.constexpr, MXFP4: tl.constexpr):
    """(BN, NGT, G/P) float32: per stored word of the step, Σ over its P codes of (scale·v + bias)·x.
    A word's codes sit in the thread that loaded it (_spread), so this sum needs no other thread; the
    sum across threads waits for the end of the K loop instead of costing shuffles at every step."""
    BN: tl.constexpr = v.shape[0]
    NGT: tl.constexpr = v.shape[1]
    G: tl.constexpr = v.shape[2]
    v4 = tl.reshape(v, (BN, NGT, G // P, P))
    x4 = tl.reshape(x, (NGT, G // P, P))
    part = tl.sum(v4 * x4[None, :, :, :], 3) * scale[:, :, None]
    if not MXFP4:
        part += bias[:, :, None] * tl.sum(x4, 2)[None, :, :]
    return part


@triton.jit
def _x_int16(x, G: tl.constexpr, BLOCK_K: tl.constexpr, P: tl.constexpr, PAIRS_BY_NIBBLE: tl.constexpr):
    """x (NGT, G) float32 → its codes xq = round(x / dx) in int16 per group (dx = max |x| / 32767), as four
    int32 words (W,) of int16 pairs, each the pair of x elements one integer dot-product instruction meets
    (_word_idot) — (0, 1), (2, 3), … in element order, or, for affine 4-bit words (PAIRS_BY_NIBBLE), the
    even-nibble pairs (0, 2), (4, 6) then the odd ones (1, 3), (5, 7) — and dx (NGT,). The rounding adds
    1.5·2^23, which leaves round(x / dx) in the low mantissa bits; 15 bits a group keep more of x than its
    bfloat16 storage has."""
    W: tl.constexpr = BLOCK_K // P
    amax = tl.max(tl.abs(x), 1)
    inv = tl.where(amax > 1e-30, 32767.0 / tl.maximum(amax, 1e-30), 0.0)  # all-zero (or vanishing) groups: 0
    xq = tl.reshape((x * inv[:, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000, (W, P))
    lo, hi = tl.split(tl.reshape(xq, (W, P // 2, 2)))
    if PAIRS_BY_NIBBLE:  # lo: elements 0, 2, 4, 6 of each word; hi: 1, 3, 5, 7
        e0, e1 = tl.split(tl.reshape(lo, (W, 2, 2)))  # (0, 4), (2, 6)
        o0, o1 = tl.split(tl.reshape(hi, (W, 2, 2)))  # (1, 5), (3, 7)
        x0, x1 = tl.split(tl.reshape((e0 & 0xFFFF) | (e1 << 16), (W, 2)))  # (0, 2), (4, 6)
        x2, x3 = tl.split(tl.reshape((o0 & 0xFFFF) | (o1 << 16), (W, 2)))  # (1, 3), (5, 7)
    else:
        packed = (lo & 0xFFFF) | (hi << 16)  # (W, P/2): pairs in element order
        if P == 8:
            a, b = tl.split(tl.reshape(packed, (W, 2, 2)))
            x0, x2 = tl.split(a)
            x1, x3 = tl.split(b)
        else:
            x0, x1 = tl.split(packed)
            x2 = x0
            x3 = x1
    return x0, x1, x2, x3, amax / 32767.0


# _word_idot's instructions, a word w ($1) against four int16 pairs ($2 … $5) → $0 (PTX ISA: dp2a, prmt;
# the E2M1 tables: 2·E2M1 as bytes, 0 … 12 and 0 … −12)
_DP2A_E2M1 = tl.constexpr("""{ .reg .b32 s, t, p, n, v, h, pa, pb, na, nb;
mov.b32 pa, 0x03020100; mov.b32 pb, 0x0C080604; mov.b32 na, 0xFDFEFF00; mov.b32 nb, 0xF4F8FAFC;
mov.b32 $0, 0; mov.b32 h, $1;
and.b32 s, h, 0x7777; shr.b32 t, h, 1; and.b32 t, t, 0x4444; or.b32 t, t, 0x3210;
prmt.b32 p, pa, pb, s; prmt.b32 n, na, nb, s; prmt.b32 v, p, n, t;
dp2a.lo.s32.s32 $0, $2, v, $0; dp2a.hi.s32.s32 $0, $3, v, $0;
shr.b32 h, h, 16;
and.b32 s, h, 0x7777; shr.b32 t, h, 1; and.b32 t, t, 0x4444; or.b32 t, t, 0x3210;
prmt.b32 p, pa, pb, s; prmt.b32 n, na, nb, s; prmt.b32 v, p, n, t;
dp2a.lo.s32.s32 $0, $4, v, $0; dp2a.hi.s32.s32 $0, $5, v, $0; }""")
_DP2A_NIBBLES = tl.constexpr("""{ .reg .b32 lo, hi;
and.b32 lo, $1, 0x0F0F0F0F; shr.b32 hi, $1, 4; and.b32 hi, hi, 0x0F0F0F0F;
mov.b32 $0, 0; dp2a.lo.s32.u32 $0, $2, lo, $0; dp2a.hi.s32.u32 $0, $3, lo, $0;
dp2a.lo.s32.u32 $0, $4, hi, $0; dp2a.hi.s32.u32 $0, $5, hi, $0; }""")
_DP2A_BYTES = tl.constexpr("mov.b32 $0, 0; dp2a.lo.s32.u32 $0, $2, $1, $0; dp2a.hi.s32.u32 $0, $3, $1, $0;")


@triton.jit
def _asm_dot(asm: tl.constexpr, w, a0, a1, a2, a3):
    return tl.inline_asm_elementwise(asm, "=r,r,r,r,r,r", [w.to(tl.int32, bitcast=True), a0, a1, a2, a3],
                                     dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _word_idot(w, x0, x1, x2, x3, BITS: tl.constexpr, MXFP4: tl.constexpr, MODE: tl.constexpr):
    """int32 (BN, W): per stored word w (BN, W), Σ over its codes of code·xq, the x codes as the int16
    pairs of _x_int16 (W,) — affine codes as stored, MXFP4 as 2·E2M1 (−12 … 12). MODE 2: a dp2a
    instruction per pair (two int16 × 8-bit products each), MXFP4 nibbles made signed bytes by two byte
    permutes over tables of the positive and negative values and a third picking by the sign; MODE 1: the
    same operands and products from plain Triton operations, step for step (the CPU interpreter runs no
    inline assembly)."""
    if MODE == 2:
        a0 = tl.broadcast_to(x0[None, :], w.shape)
        a1 = tl.broadcast_to(x1[None, :], w.shape)
        a2 = tl.broadcast_to(x2[None, :], w.shape)
        a3 = tl.broadcast_to(x3[None, :], w.shape)
        if MXFP4:
            return _asm_dot(_DP2A_E2M1, w, a0, a1, a2, a3)
        elif BITS == 4:
            return _asm_dot(_DP2A_NIBBLES, w, a0, a1, a2, a3)
        else:  # 8-bit: the word's bytes are its codes; a2, a3 repeat a0, a1 and are not read
            return _asm_dot(_DP2A_BYTES, w, a0, a1, a2, a3)
    else:
        w = w.to(tl.int32, bitcast=True)
        if BITS == 8:
            return _dp2a(x0[None, :], w, False, False) + _dp2a(x1[None, :], w, True, False)
        if MXFP4:
            lo = _e2m1_bytes(w)
            hi = _e2m1_bytes(w >> 16)
        else:
            lo = w & 0x0F0F0F0F
            hi = (w >> 4) & 0x0F0F0F0F
        return (_dp2a(x0[None, :], lo, False, MXFP4) + _dp2a(x1[None, :], lo, True, MXFP4)
                + _dp2a(x2[None, :], hi, False, MXFP4) + _dp2a(x3[None, :], hi, True, MXFP4))  # fmt: skip


@triton.jit
def _dp2a(a, b, HI: tl.constexpr, SIGNED: tl.constexpr):
    """dp2a's integer: a's two int16 halves times bytes 0, 1 of b (2, 3 with HI), unsigned or signed."""
    SH: tl.constexpr = 16 if HI else 0
    b0 = (b >> SH) & 0xFF
    b1 = (b >> (SH + 8)) & 0xFF
    if SIGNED:
        b0 = (b0 ^ 0x80) - 0x80
        b1 = (b1 ^ 0x80) - 0x80
    return ((a << 16) >> 16) * b0 + (a >> 16) * b1


@triton.jit
def _e2m1_bytes(h):
    """The low four E2M1 nibbles of h as the signed bytes 2·E2M1 the byte permutes of _word_idot build."""
    v = tl.zeros_like(h)
    for i in tl.static_range(4):
        q = (h >> (4 * i)) & 15
        e = (q >> 1) & 3
        m = q & 1
        t = tl.where(e == 0, m, (2 + m) << tl.maximum(e - 1, 0))
        v |= (tl.where((q & 8) != 0, -t, t) & 0xFF) << (8 * i)
    return v


@triton.jit
def _word_step(w, s, b, x, x0, x1, x2, x3, dx, BITS: tl.constexpr, G: tl.constexpr, MXFP4: tl.constexpr,
               MAGIC: tl.constexpr, INT_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """One K step of whole-code words w (BN, W) with their raw scales s and biases b against x (NGT, G)
    (and, with INT_DOT, its int16 pairs x0 … x3 and steps dx of _x_int16): the per-word sums (BN, NGT,
    G/P) and the integer dot's bias·Σx per group (BN, NGT), which the float paths fold into the former."""
    P: tl.constexpr = 32 // BITS
    NGT: tl.constexpr = BLOCK_K // G
    acc_b = tl.zeros((BLOCK_N, NGT), tl.float32)
    if INT_DOT != 0:
        dots = _word_idot(w, x0, x1, x2, x3, BITS, MXFP4, INT_DOT)
        if MXFP4:
            f = _e8m0(s) * (0.5 * dx)[None, :]  # the codes are 2·E2M1
        else:
            f = s.to(tl.float32) * dx[None, :]
            acc_b = b.to(tl.float32) * tl.sum(x, 1)[None, :]
        part = tl.reshape(dots.to(tl.float32), (BLOCK_N, NGT, G // P)) * f[:, :, None]
    elif MXFP4 and MAGIC:
        part = _e2m1_word_dot(w, s, x, G, BLOCK_N, BLOCK_K)
    else:
        v, scale, bias = _values(_spread(w, BITS, BLOCK_N, BLOCK_K), s, b, BITS, G, MXFP4, MAGIC, BLOCK_N, BLOCK_K)
        part = _word_dot(v, scale, bias, x, P, MXFP4)
    return part, acc_b


@triton.jit
def _word_total(acc, acc_b, MXFP4: tl.constexpr, MAGIC: tl.constexpr, INT_DOT: tl.constexpr):
    """(BN,) float32: the K loop's per-word sums and bias terms summed, unscaled (_e2m1_word_dot's 2^62)."""
    total = tl.sum(tl.sum(acc, 2), 1) + tl.sum(acc_b, 1)
    if MXFP4 and MAGIC and INT_DOT == 0:
        total *= 4.611686018427388e18  # 2^62
    return total


@triton.jit
def _row_matvecs(x_ptr, w_ptr, s_ptr, b_ptr, w2_ptr, s2_ptr, b2_ptr, offs_n, n_mask, k_start, k_end, stride_wn,
                 stride_sn, BITS: tl.constexpr, G: tl.constexpr, MXFP4: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, MAGIC: tl.constexpr, INT_DOT: tl.constexpr, TWO: tl.constexpr):  # fmt: skip
    """(BLOCK_N,) float32 twice: rows offs_n of W (from the stored layout) times x[k_start:k_end], and with
    TWO the same rows of a second matrix W2 stored alike (the MoE's gate and up) in the same K loop — x
    loaded and rounded once a step for both, both matrices' next words in flight together; without TWO
    the second is zeros.

    INT_DOT (1: emulated, 2: dp2a; bits 4 and 8, MXFP4): x is rounded to int16 per group at each step
    (_x_int16) and each word's codes meet it in integer dot products, about one instruction a weight
    where the float decode takes six; per group the integer sum times dx·scale, plus bias·Σx from x
    itself."""
    if 32 % BITS == 0:
        P: tl.constexpr = 32 // BITS
        NGT: tl.constexpr = BLOCK_K // G
        acc = tl.zeros((BLOCK_N, NGT, G // P), tl.float32)
        acc_b = tl.zeros((BLOCK_N, NGT), tl.float32)
        acc2 = tl.zeros((BLOCK_N, NGT, G // P), tl.float32)
        acc2_b = tl.zeros((BLOCK_N, NGT), tl.float32)
        # a register double buffer: the next step's words and scales are requested before this step's
        # arithmetic, so each program keeps two steps of loads in flight
        w = _words(w_ptr, offs_n, n_mask, k_start, k_end, stride_wn, BITS, G, BLOCK_K)
        s, b = _scales(s_ptr, b_ptr, offs_n, n_mask, k_start, k_end, stride_sn, G, MXFP4, BLOCK_K)
        w2, s2, b2 = w, s, b
        if TWO:
            w2 = _words(w2_ptr, offs_n, n_mask, k_start, k_end, stride_wn, BITS, G, BLOCK_K)
            s2, b2 = _scales(s2_ptr, b2_ptr, offs_n, n_mask, k_start, k_end, stride_sn, G, MXFP4, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            w_next = _words(w_ptr, offs_n, n_mask, k0 + BLOCK_K, k_end, stride_wn, BITS, G, BLOCK_K)
            s_next, b_next = _scales(s_ptr, b_ptr, offs_n, n_mask, k0 + BLOCK_K, k_end, stride_sn, G, MXFP4, BLOCK_K)
            w2_next, s2_next, b2_next = w_next, s_next, b_next
            if TWO:
                w2_next = _words(w2_ptr, offs_n, n_mask, k0 + BLOCK_K, k_end, stride_wn, BITS, G, BLOCK_K)
                s2_next, b2_next = _scales(s2_ptr, b2_ptr, offs_n, n_mask, k0 + BLOCK_K, k_end, stride_sn, G, MXFP4,
                                           BLOCK_K)  # fmt: skip
            x = _x_tile(x_ptr, k0, k_end, G, BLOCK_K)
            x0, x1, x2, x3, dx = x, x, x, x, x  # placeholders: only the integer dots read them
            if INT_DOT != 0:
                x0, x1, x2, x3, dx = _x_int16(x, G, BLOCK_K, P, BITS == 4 and not MXFP4)
            part, part_b = _word_step(w, s, b, x, x0, x1, x2, x3, dx, BITS, G, MXFP4, MAGIC, INT_DOT, BLOCK_N,
                                      BLOCK_K)  # fmt: skip
            acc += part
            acc_b += part_b
            if TWO:
                part, part_b = _word_step(w2, s2, b2, x, x0, x1, x2, x3, dx, BITS, G, MXFP4, MAGIC, INT_DOT, BLOCK_N,
                                          BLOCK_K)  # fmt: skip
                acc2 += part
                acc2_b += part_b
            w, s, b = w_next, s_next, b_next
            w2, s2, b2 = w2_next, s2_next, b2_next
        return _word_total(acc, acc_b, MXFP4, MAGIC, INT_DOT), _word_total(acc2, acc2_b, MXFP4, MAGIC, INT_DOT)
    else:
        acc = tl.zeros((BLOCK_N,), tl.float32)
        acc2 = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            x = _x_tile(x_ptr, k0, k_end, G, BLOCK_K)
            v, scale, bias = _step(w_ptr, s_ptr, b_ptr, offs_n, n_mask, k0, k_end, stride_wn, stride_sn, BITS, G,
                                   MXFP4, MAGIC, BLOCK_N, BLOCK_K)  # fmt: skip
            acc += _row_dot(v, scale, bias, x, MXFP4)
            if TWO:
                v, scale, bias = _step(w2_ptr, s2_ptr, b2_ptr, offs_n, n_mask, k0, k_end, stride_wn, stride_sn, BITS,
                                       G, MXFP4, MAGIC, BLOCK_N, BLOCK_K)  # fmt: skip
                acc2 += _row_dot(v, scale, bias, x, MXFP4)
        return acc, acc2


@triton.jit
def _row_matvec(x_ptr, w_ptr, s_ptr, b_ptr, offs_n, n_mask, k_start, k_end, stride_wn, stride_sn,
                BITS: tl.constexpr, G: tl.constexpr, MXFP4: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, MAGIC: tl.constexpr, INT_DOT: tl.constexpr):  # fmt: skip
    """(BLOCK_N,) float32: rows offs_n of W times x[k_start:k_end] (_row_matvecs with one matrix)."""
    acc, _ = _row_matvecs(x_ptr, w_ptr, s_ptr, b_ptr, w_ptr, s_ptr, b_ptr, offs_n, n_mask, k_start, k_end,
                          stride_wn, stride_sn, BITS, G, MXFP4, BLOCK_N, BLOCK_K, MAGIC, INT_DOT, False)  # fmt: skip
    return acc


@triton.jit
def _store(acc, offs_m, offs_n, mask, out_ptr, bias_ptr, N, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
    ptr = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(ptr, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(acc, offs_m, offs_n, mask, out_ptr, part_ptr, ticket_ptr, bias_ptr, tile, sp, splits, M, N,
              stride_om, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr):  # fmt: skip
    """Write the (BM, BN) tile x·Wᵀ + bias. Split K: every split writes its float32 partial, then takes a
    ticket on the tile's counter; the last to arrive sums the partials, writes the output and resets the
    counter — one launch, no second pass."""
    if DIRECT:
        _store(acc, offs_m, offs_n, mask, out_ptr, bias_ptr, N, stride_om, HAS_BIAS)
    else:
        rows = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        last, total = _split_sum(acc, rows, mask, part_ptr, ticket_ptr, tile, sp, splits, M * N)
        if last:
            _store(total, offs_m, offs_n, mask, out_ptr, bias_ptr, N, stride_om, HAS_BIAS)


@triton.jit
def _split_sum(acc, offs, mask, part_ptr, ticket_ptr, tile, sp, splits, size):
    """One split of a split-K product: write its float32 partial `acc` at `offs` of its `size`-long slice
    of part_ptr, then take a ticket on the tile's counter → (whether this program arrived last, and if so
    every split's partial summed in split order). The last resets the counter for the next launch."""
    tl.store(part_ptr + sp.to(tl.int64) * size + offs, acc, mask=mask)
    tl.debug_barrier()  # all of this program's partial is written before its ticket (acq_rel, gpu scope)
    last = tl.atomic_add(ticket_ptr + tile, 1) == splits - 1
    total = tl.zeros_like(acc)
    if last:
        for j in range(0, splits):  # .cg: read the other splits' writes from L2, never a stale L1 line
            total += tl.load(part_ptr + j * size + offs, mask=mask, other=0, cache_modifier=".cg")
        tl.atomic_xchg(ticket_ptr + tile, 0)
    return last, total


@triton.jit
def _qmv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, out_ptr, part_ptr, ticket_ptr, M, N, K, k_per_split,
                stride_xm, stride_wn, stride_sn, stride_om, BITS: tl.constexpr, G: tl.constexpr,
                MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DIRECT: tl.constexpr, MAGIC: tl.constexpr, INT_DOT: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Grid (M, N tiles, splits): one row times BLOCK_N rows of W over one K split, on the CUDA cores."""
    wait_for_inputs(PDL)
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    sp = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = sp * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = _row_matvec(x_ptr + m.to(tl.int64) * stride_xm, w_ptr, s_ptr, b_ptr, offs_n, n_mask, k_start, k_end,
                      stride_wn, stride_sn, BITS, G, MXFP4, BLOCK_N, BLOCK_K, MAGIC, INT_DOT)  # fmt: skip
    offs_m = m + tl.arange(0, 1)
    _epilogue(acc[None, :], offs_m, offs_n, n_mask[None, :], out_ptr, part_ptr, ticket_ptr, bias_ptr,
              m * tl.num_programs(1) + pid_n, sp, tl.num_programs(2), M, N, stride_om, HAS_BIAS, DIRECT)  # fmt: skip


@triton.jit
def _qmm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, out_ptr, part_ptr, ticket_ptr, M, N, K, k_per_split,
                stride_xm, stride_wn, stride_sn, stride_om, BITS: tl.constexpr, G: tl.constexpr,
                MXFP4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, DIRECT: tl.constexpr, MAGIC: tl.constexpr,
                PRECISION: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Grid (N tiles, splits, M tiles): a BLOCK_M × BLOCK_N output tile through tl.dot, the weight tile
    dequantized in registers to x's dtype."""
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0)
    sp = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = sp * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        v, scale, bias = _step(w_ptr, s_ptr, b_ptr, offs_n, n_mask, k0, k_end, stride_wn, stride_sn, BITS, G,
                               MXFP4, MAGIC, BLOCK_N, BLOCK_K)  # fmt: skip
        w = tl.reshape(v * scale[:, :, None] + bias[:, :, None], (BLOCK_N, BLOCK_K))
        x = tl.load(x_rows + k0 + offs_k[None, :], mask=m_mask[:, None] & (k0 + offs_k < k_end)[None, :], other=0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    mask = m_mask[:, None] & n_mask[None, :]
    _epilogue(acc, offs_m, offs_n, mask, out_ptr, part_ptr, ticket_ptr, bias_ptr, pid_m * tl.num_programs(0) + pid_n,
              sp, tl.num_programs(1), M, N, stride_om, HAS_BIAS, DIRECT)  # fmt: skip


@triton.jit
def _rows_kernel(ids_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, K, stride_wn, stride_sn, BITS: tl.constexpr,
                 G: tl.constexpr, MXFP4: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):  # fmt: skip
    """Grid (N tiles, K steps): rows ids[…] of the stored weight decoded to out's dtype — scale·q + bias
    in float32, rounded once, as affine.dequantize and mxfp4.decode compute it (so no MAGIC here)."""
    wait_for_inputs(PDL)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    rows = tl.load(ids_ptr + offs, mask=mask, other=0)
    k0 = tl.program_id(1) * BLOCK_K
    v, scale, bias = _step(w_ptr, s_ptr, b_ptr, rows, mask, k0, K, stride_wn, stride_sn, BITS, G, MXFP4, False,
                           BLOCK_N, BLOCK_K)  # fmt: skip
    w = tl.reshape(v * scale[:, :, None] + bias[:, :, None], (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptr = out_ptr + offs[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(ptr, w.to(out_ptr.dtype.element_ty), mask=mask[:, None] & (offs_k < K)[None, :])


# ----------------------------------------------------------------------------------------------- wrappers

TICKETS = 1 << 16  # split-K arrival counters per device (zero between launches: the last split resets its own)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: one "multiprocessor", so no split unless asked for
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _tickets(device: torch.device) -> Tensor:
    return torch.zeros(TICKETS, dtype=torch.int32, device=device)


LARGE_N = 8448  # outputs from which 16-row programs alone fill the H200 (4 per SM): the lm_head


def default_tiles(m: int, n: int, k: int, spec: QuantSpec) -> Tiles:
    """The launch shape for an (m, k) × (n, k)ᵀ product, the fastest of benchmarks/kernels.py's sweep on
    the H200 (benchmarks/kernels-h200.md): few rows per program and long K steps for the layer-sized
    matrices, 16-row programs for the lm_head."""
    fit = max(spec.group_size, triton.next_power_of_2(k))  # no K step longer than the row
    if m <= REDUCE_MAX_ROWS:
        if n >= LARGE_N:
            return Tiles(block_n=16, block_k=min(512, fit), num_warps=4)
        return Tiles(block_n=4, block_k=min(1024, fit), num_warps=2)
    block_m = 16 if m <= 16 else 32 if m <= 64 else 64
    return Tiles(block_n=64, block_k=2 * max(64, spec.group_size), block_m=block_m, num_warps=4)


def _split(tiles_count: int, k: int, tiles: Tiles, device: torch.device) -> tuple[int, int]:
    """(splits, K per split): split K while the grid has fewer than PROGRAMS_PER_SM programs per SM (and
    the output tiles fit the arrival counters)."""
    k_steps = triton.cdiv(k, tiles.block_k)
    want = tiles.split_k or triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(device), tiles_count)
    if tiles_count > TICKETS:
        want = 1
    per_split = triton.cdiv(k_steps, max(1, min(want, k_steps))) * tiles.block_k
    return triton.cdiv(k, per_split), per_split


def check_layout(w: Tensor, scales: Tensor, biases: Tensor | None, spec: QuantSpec, k: int) -> None:
    """Assert our own invariant: the stored tensors are contiguous (…, N, ·) rows of a K-wide weight."""
    assert w.is_contiguous() and scales.is_contiguous(), "quantized weights must be contiguous"
    assert w.shape[-1] * 32 == k * spec.bits and scales.shape[-1] * spec.group_size == k, (w.shape, k, spec)
    assert biases is None or biases.shape == scales.shape


def int_dot_mode(flag: bool | None, dtype: torch.dtype, spec: QuantSpec, device: torch.device) -> int:
    """_row_matvec's INT_DOT for activations of `dtype`: 0 (float decode), 1 (integer dot, emulated: the
    interpreter), 2 (dp2a). `flag` None: on for bfloat16 and float16 activations, whose bits int16 codes
    keep, off for float32 ones (the float path is exact to rounding there); bits 4 and 8 and MXFP4 only."""
    on = dtype != torch.float32 if flag is None else flag
    if not on or spec.bits not in (4, 8):
        return 0
    return 2 if device.type == "cuda" else 1


def qmm(
    x: Tensor,
    weight: Tensor,
    scales: Tensor,
    biases: Tensor | None,
    bias: Tensor | None,
    spec: QuantSpec,
    *,
    tiles: Tiles | None = None,
) -> Tensor:
    """x (M, K) float × stored W (N, K) → (M, N) in x's dtype: x Wᵀ + bias, decoding W in registers; one
    launch. `weight` uint32/int32 (N, K·bits/32); `scales` (N, K/G) (uint8 E8M0 for MXFP4); `biases` like
    scales (affine only); `bias` (N,) or None."""
    x = x.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    check_layout(weight, scales, biases, spec, K)
    tiles = tiles or default_tiles(M, N, K, spec)
    assert tiles.block_k % spec.group_size == 0
    reduce = M <= REDUCE_MAX_ROWS
    row_tiles = M if reduce else triton.cdiv(M, tiles.block_m)
    n_tiles = triton.cdiv(N, tiles.block_n)
    splits, per_split = _split(row_tiles * n_tiles, K, tiles, x.device)
    direct = splits == 1
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part = out if direct else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    tickets = out if direct else _tickets(x.device)
    w32 = weight.view(torch.int32)
    b_arg = scales if biases is None else biases
    bias_arg = bias if bias is not None else scales
    args = (x, w32, scales, b_arg, bias_arg, out, part, tickets, M, N, K, per_split, x.stride(0), w32.stride(0),
            scales.stride(0), out.stride(0))  # fmt: skip
    common = dict(BITS=spec.bits, G=spec.group_size, MXFP4=spec.mode == "mxfp4", HAS_BIAS=bias is not None,
                  BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, DIRECT=direct, MAGIC=tiles.magic,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages, **launch_args(x.device))  # fmt: skip
    if reduce:
        _qmv_kernel[(M, n_tiles, splits)](*args, INT_DOT=int_dot_mode(tiles.int_dot, x.dtype, spec, x.device), **common)
    else:
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _qmm_kernel[(n_tiles, splits, row_tiles)](*args, BLOCK_M=tiles.block_m, PRECISION=precision, **common)
    return out


def dequantize_rows(
    ids: Tensor, weight: Tensor, scales: Tensor, biases: Tensor | None, spec: QuantSpec, dtype: torch.dtype
) -> Tensor:
    """Rows `ids` (N,) of a stored (R, K) weight, decoded → (N, K) in `dtype`, in one launch: the embedding
    lookup, reading only the rows it gathers (engine/ops.py's `dequantize` of the same rows, in float32
    and rounded once)."""
    ids = ids.contiguous()
    N = ids.shape[0]
    K = scales.shape[-1] * spec.group_size
    check_layout(weight, scales, biases, spec, K)
    out = torch.empty(N, K, dtype=dtype, device=ids.device)
    if N:
        block_k = max(256, spec.group_size)
        w32 = weight.view(torch.int32)
        _rows_kernel[(triton.cdiv(N, 4), triton.cdiv(K, block_k))](
            ids, w32, scales, scales if biases is None else biases, out, N, K, w32.stride(0), scales.stride(0),
            BITS=spec.bits, G=spec.group_size, MXFP4=spec.mode == "mxfp4", BLOCK_N=4, BLOCK_K=block_k,
            **launch_args(ids.device),
        )  # fmt: skip
    return out
