"""Paged decode attention with sinks: one query token per sequence over the KV pool (engine/kv.py), GQA,
sliding or full window (formats.md §4.7 d–e).

Grid (S sequences, K kv heads, splits). A program takes the REP = H/K query heads that share its kv head
(padded to the 16-row MMA tile, so q·kᵀ and p·v run on the tensor cores) and streams the keys and values
of its slice of the sequence's visible positions — the last min(length, window) ones — through the block
table, BLOCK_T positions a step with the next step's loads in flight, with an online softmax.
Lengths and block tables are read on the device (`Batch.seq_lens`, `Batch.block_tables`), and so is the
split of each sequence: the host fixes only the number of splits, from the batch's size and the GPU's,
and each program computes its slice from its sequence's length. Nothing is read back, and the launch is
the same for every length, so a CUDA graph captured once replays for any context.

The sink S_h is one more logit with no value vector: the first split starts its running max at S_h and
its denominator at exp(S_h − S_h) = 1, which is formats.md §4.7e's `exp(S_h − m)` in the denominator.
With several splits (long contexts, few sequences) each split that has positions writes (max, denominator,
unnormalised output) and takes a ticket on its (sequence, kv head)'s counter; the last to arrive merges
them (`_merge_splits`) and resets the counter, so a step is one launch whatever the split. A context
that fills only one split (short, or a sliding window no longer than MIN_SPLIT_TOKENS, for which the host
asks for one split) is written directly by that split.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ossq.engine.batch import Batch
from ossq.engine.kv import BLOCK_TOKENS
from ossq.engine.triton.launch import launch_args, wait_for_inputs
from ossq.engine.triton.qmm import TICKETS, _tickets

BLOCK_T = 32  # positions per step (two pool blocks)
PROGRAMS_PER_SM = 2  # split the sequence until the grid has about this many programs per multiprocessor
MIN_SPLIT_TOKENS = 256  # …but give each split at least this many positions
MERGE_CHUNK = 8  # splits the last-arriving program merges a step
NEG = tl.constexpr(-1.0e30)  # a finite "minus infinity" for the running max, so empty steps never make NaN


@triton.jit
def _kv_tile(k_ptr, v_ptr, table, p0, lo, end, kvh, stride_kr, stride_kh, offs_t, offs_d, d_mask,
             PAGE: tl.constexpr):  # fmt: skip
    """Keys and values (BLOCK_T, BLOCK_D) of positions p0 … p0 + BLOCK_T through the block table, zero
    outside [lo, end) (those positions' blocks are never touched: they may be released)."""
    pos = p0 + offs_t
    valid = (pos >= lo) & (pos < end)
    block = tl.load(table + pos // PAGE, mask=valid, other=0).to(tl.int64)
    off = (block * PAGE + pos % PAGE)[:, None] * stride_kr + kvh * stride_kh + offs_d[None, :]
    mask = valid[:, None] & d_mask[None, :]
    return tl.load(k_ptr + off, mask=mask, other=0), tl.load(v_ptr + off, mask=mask, other=0)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, sinks_ptr, tables_ptr, lens_ptr, out_ptr, ml_ptr, acc_ptr, ticket_ptr,
                   window, scale, min_split, stride_qs, stride_qh, stride_kr, stride_kh, stride_ts,
                   REP: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_T: tl.constexpr, PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, ONE_SPLIT: tl.constexpr,
                   CHUNK: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    wait_for_inputs(PDL)
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    splits = tl.num_programs(2)
    H = tl.num_programs(1) * REP
    length = tl.load(lens_ptr + s)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(length - window, 0)  # the query at length − 1 sees positions > length − 1 − window
    first = (lo // BLOCK_T) * BLOCK_T
    # the visible span in `splits` slices of whole steps, none shorter than min_split positions
    per = tl.maximum(tl.cdiv(tl.cdiv(length - first, splits), BLOCK_T) * BLOCK_T, min_split)
    start = first + sp * per
    end = tl.minimum(start + per, length)

    offs_r = tl.arange(0, BLOCK_R)  # the query heads of this kv head, padded to the MMA tile
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    r_mask = offs_r < REP
    d_mask = offs_d < D
    heads = kvh * REP + offs_r
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0)  # fmt: skip
    if sp == 0:
        m = tl.load(sinks_ptr + heads, mask=r_mask, other=0).to(tl.float32)
        l = tl.full((BLOCK_R,), 1.0, tl.float32)
    else:
        m = tl.full((BLOCK_R,), NEG, tl.float32)
        l = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    table = tables_ptr + s.to(tl.int64) * stride_ts
    # a register double buffer: the next step's keys and values are requested before this step's math
    k, v = _kv_tile(k_ptr, v_ptr, table, start, lo, end, kvh, stride_kr, stride_kh, offs_t, offs_d, d_mask, PAGE)
    for p0 in range(start, end, BLOCK_T):
        k_next, v_next = _kv_tile(k_ptr, v_ptr, table, p0 + BLOCK_T, lo, end, kvh, stride_kr, stride_kh, offs_t,
                                  offs_d, d_mask, PAGE)  # fmt: skip
        pos = p0 + offs_t
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_R, BLOCK_T)
        scores = tl.where(((pos >= lo) & (pos < end))[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
        k, v = k_next, v_next
    o_mask = r_mask[:, None] & d_mask[None, :]
    o_ptr = out_ptr + s * stride_qs + heads[:, None] * stride_qh + offs_d[None, :]
    used = tl.cdiv(length - first, per)  # the splits with positions; the rest have nothing to add
    if ONE_SPLIT or used == 1:
        if sp == 0:
            tl.store(o_ptr, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
    elif sp < used:
        row = (s * H + heads) * splits + sp  # partials laid out (S, H, splits, ·)
        tl.store(ml_ptr + row * 2, m, mask=r_mask)
        tl.store(ml_ptr + row * 2 + 1, l, mask=r_mask)
        tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=o_mask)
        tl.debug_barrier()  # this program's partials are written before its ticket (acq_rel, gpu scope)
        counter = ticket_ptr + s * tl.num_programs(1) + kvh
        if tl.atomic_add(counter, 1) == used - 1:  # the last split of this kv head to finish merges them all
            _merge_splits(ml_ptr, acc_ptr, o_ptr, (s * H + heads) * splits, used, r_mask, o_mask, offs_d, D, CHUNK)
            tl.atomic_xchg(counter, 0)


@triton.jit
def _merge_splits(ml_ptr, acc_ptr, o_ptr, row0, used, r_mask, o_mask, offs_d, D: tl.constexpr, CHUNK: tl.constexpr):
    """Merge the (max, denominator, unnormalised output) partials of splits 0 … used of the heads whose
    partials start at rows row0 (BLOCK_R,) into their output, CHUNK splits a step; .cg reads the other
    programs' writes from L2, never a stale L1 line."""
    offs_c = tl.arange(0, CHUNK)
    top = tl.full(row0.shape, NEG, tl.float32)
    for c in range(0, used, CHUNK):
        mask = r_mask[:, None] & (c + offs_c < used)[None, :]
        m = tl.load(ml_ptr + (row0[:, None] + c + offs_c[None, :]) * 2, mask=mask, other=NEG, cache_modifier=".cg")
        top = tl.maximum(top, tl.max(m, 1))
    den = tl.zeros(row0.shape, tl.float32)
    out = tl.zeros(o_mask.shape, tl.float32)
    for c in range(0, used, CHUNK):
        rows = row0[:, None] + c + offs_c[None, :]  # (BLOCK_R, CHUNK)
        mask = r_mask[:, None] & (c + offs_c < used)[None, :]
        m = tl.load(ml_ptr + rows * 2, mask=mask, other=NEG, cache_modifier=".cg")
        w = tl.where(mask, tl.exp(m - top[:, None]), 0.0)
        den += tl.sum(w * tl.load(ml_ptr + rows * 2 + 1, mask=mask, other=0, cache_modifier=".cg"), 1)
        acc = tl.load(acc_ptr + rows[:, :, None] * D + offs_d[None, None, :],
                      mask=mask[:, :, None] & o_mask[:, None, :], other=0, cache_modifier=".cg")  # fmt: skip
        out += tl.sum(acc * w[:, :, None], 1)
    tl.store(o_ptr, (out / tl.where(r_mask, den, 1.0)[:, None]).to(o_ptr.dtype.element_ty), mask=o_mask)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def splits_for(num_seqs: int, kv_heads: int, device: torch.device, window: int | None = None,
               min_split: int = MIN_SPLIT_TOKENS) -> int:  # fmt: skip
    """How many slices each sequence is cut into: enough for about PROGRAMS_PER_SM programs per
    multiprocessor; one where the window is short enough for one slice to cover it from any length. A
    slice that would be shorter than `min_split` is left empty instead (the kernel sizes slices from the
    length), so short contexts pay only a few idle programs."""
    if window is not None and window + BLOCK_T <= min_split:
        return 1
    return triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(device), num_seqs * kv_heads)


def decode(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    sinks: Tensor,
    batch: Batch,
    *,
    window: int | None,
    scale: float,
    splits: int | None = None,
    min_split: int = MIN_SPLIT_TOKENS,
) -> Tensor:
    """q (S, H, D), one query per sequence at position seq_len − 1 → (S, H, D) in q's dtype. Pools
    (slots, K, D) as engine/kv.py; `splits` and `min_split` (a multiple of BLOCK_T) force the split."""
    S, H, D = q.shape
    K = k_pool.shape[1]
    assert S == batch.num_seqs and H % K == 0 and k_pool.stride(2) == 1 and q.stride(2) == 1
    rep = H // K
    splits = splits or splits_for(S, K, q.device, window, min_split)
    out = torch.empty_like(q)
    ml = acc = tickets = out
    if splits > 1:
        assert S * K <= TICKETS
        ml = torch.empty(S, H, splits, 2, dtype=torch.float32, device=q.device)
        acc = torch.empty(S, H, splits, D, dtype=torch.float32, device=q.device)
        tickets = _tickets(q.device)
    tables = batch.block_tables
    _decode_kernel[(S, K, splits)](
        q, k_pool, v_pool, sinks, tables, batch.seq_lens, out, ml, acc, tickets, window or 0, float(scale), min_split,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), tables.stride(0),
        REP=rep, D=D, BLOCK_R=max(16, triton.next_power_of_2(rep)), BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_T=BLOCK_T, PAGE=BLOCK_TOKENS, HAS_WINDOW=window is not None, ONE_SPLIT=splits == 1, CHUNK=MERGE_CHUNK,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **launch_args(q.device),
    )  # fmt: skip
    return out
