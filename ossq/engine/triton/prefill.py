"""Paged prefill attention with sinks: every query row of a mixed step (prefill chunks, a chunk after a
cached prefix, decode rows) over the KV pool (engine/kv.py), GQA, causal with a sliding or full window
(formats.md §4.7 d–e), flash style: an online softmax in float32, q·kᵀ and p·v on the tensor cores.

Grid (tiles, K kv heads). A tile is up to BLOCK_M consecutive query rows of one sequence, and a program
takes them for all REP = H/K query heads of its kv head, stacked into the rows of one MMA tile (row r is
query r // REP of the tile, head r % REP; padded to a power of two, at least 16). Every key and value
step read through the block table then serves REP · BLOCK_M rows instead of BLOCK_M: the pool is read
once per kv head, not once per query head, and gpt-oss's REP = 8 fills a 128-row tile with 16 query
positions. Short chunks and decode rows fill REP rows of their tile rather than one.

A tile's queries sit at positions first … last; it streams only the key positions they can see, from
max(0, first − window + 1) aligned down to BLOCK_N, to last, BLOCK_N a step (the pipeliner keeps
`num_stages` steps in flight). Positions outside that span are masked in the load (attention.py's
`_kv_tile`), so their block-table entries — −1 for blocks released once they left every window — are
never read; inside it, each (query, key) pair is masked by causality and the window.

The sink S_h is one more logit with no value vector, as in the decode kernel: the running max starts at
S_h and the denominator at exp(S_h − S_h) = 1, so S_h enters only the denominator (formats.md §4.7e).

The work list — (sequence, first row, rows, first position) per tile — is built on the host from
`Batch.host_query_start` and `host_seq_lens`: prefill runs eagerly (no CUDA graph), and the host copies
already hold the lengths, so nothing is read back. It is the same for every layer of a step, so the last
batch's list is kept and each step builds it once. Tiles come longest key span first, so that the long
causal tiles of a prompt's end start early instead of finishing last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ossq.engine.batch import Batch, device_tensor
from ossq.engine.kv import BLOCK_TOKENS
from ossq.engine.triton.attention import _kv_tile
from ossq.engine.triton.launch import launch_args, wait_for_inputs

TILE_ROWS = 128  # MMA rows a tile aims for: the default BLOCK_M is TILE_ROWS // REP query positions
BLOCK_N = 64  # key positions per step (four pool blocks)
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, sinks_ptr, tables_ptr, work_ptr, out_ptr, window, scale, stride_qn,
                    stride_qh, stride_on, stride_oh, stride_kr, stride_kh, stride_ts, REP: tl.constexpr,
                    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                    PDL: tl.constexpr):  # fmt: skip
    wait_for_inputs(PDL)
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    work = work_ptr + tile * 4  # (sequence, first query row, rows, position of the first row)
    s = tl.load(work)
    row0 = tl.load(work + 1)
    rows = tl.load(work + 2)
    pos0 = tl.load(work + 3)
    end = pos0 + rows  # one past the tile's last query position: its keys end there
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos0 - window + 1, 0)  # the first query sees positions > pos0 − window

    offs_r = tl.arange(0, BLOCK_R)  # the tile's (query, head) pairs, query-major
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    query = offs_r // REP
    heads = kvh * REP + offs_r % REP
    r_mask = query < rows
    d_mask = offs_d < D
    q_pos = pos0 + query
    q_rows = (row0 + query).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0)  # fmt: skip
    m = tl.load(sinks_ptr + heads, mask=r_mask, other=0).to(tl.float32)
    l = tl.full((BLOCK_R,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    table = tables_ptr + s.to(tl.int64) * stride_ts
    for p0 in range((lo // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        k, v = _kv_tile(k_ptr, v_ptr, table, p0, lo, end, kvh, stride_kr, stride_kh, offs_n, offs_d, d_mask, PAGE)
        pos = p0 + offs_n
        visible = pos[None, :] <= q_pos[:, None]
        if HAS_WINDOW:
            visible &= pos[None, :] > q_pos[:, None] - window
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_R, BLOCK_N)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new
    out = acc / l[:, None]
    o_ptr = out_ptr + q_rows[:, None] * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


_last: tuple[Batch, int, Tensor] | None = None  # (batch, block_m, its work list): the step being run


def work_list(batch: Batch, block_m: int) -> Tensor:
    """(tiles, 4) int32 on the batch's device, a tile's (sequence, first query row, rows, position of the
    first row): each sequence's rows cut into tiles of `block_m`, longest key span first. Kept for the
    last batch, which it holds so that no later batch can take its identity."""
    global _last
    if _last is None or _last[0] is not batch or _last[1] != block_m:
        starts, tiles = batch.host_query_start, []
        for s, length in enumerate(batch.host_seq_lens):
            T = starts[s + 1] - starts[s]
            tiles += [(s, starts[s] + m0, min(block_m, T - m0), length - T + m0) for m0 in range(0, T, block_m)]
        tiles.sort(key=lambda t: t[2] + t[3], reverse=True)
        _last = (batch, block_m, device_tensor(tiles, torch.int32, batch.query_start.device))
    return _last[2]


def prefill(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    sinks: Tensor,
    batch: Batch,
    *,
    window: int | None,
    scale: float,
    block_m: int | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> Tensor:
    """q (N, H, D), every query row of the step, sequence s's rows at positions seq_len_s − T_s …
    seq_len_s − 1, whose keys and values the pools (slots, K, D) already hold → (N, H, D) in q's dtype.
    `block_m` query positions per tile (None: TILE_ROWS // REP), `block_n` (a power of two, at least 16)
    key positions per step."""
    N, H, D = q.shape
    K = k_pool.shape[1]
    assert H % K == 0 and D <= 128 and q.stride(2) == 1 and k_pool.stride(2) == 1
    assert v_pool.stride() == k_pool.stride() and N == batch.host_query_start[-1]
    assert block_n >= 16 and block_n & (block_n - 1) == 0
    rep = H // K
    block_m = block_m or max(1, TILE_ROWS // rep)
    out = torch.empty(N, H, D, dtype=q.dtype, device=q.device)
    if N == 0:
        return out
    work = work_list(batch, block_m)
    tables = batch.block_tables
    _prefill_kernel[(work.shape[0], K)](
        q, k_pool, v_pool, sinks, tables, work, out, window or 0, float(scale), q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), k_pool.stride(0), k_pool.stride(1), tables.stride(0),
        REP=rep, D=D, BLOCK_R=max(16, triton.next_power_of_2(block_m * rep)),
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n, PAGE=BLOCK_TOKENS,
        HAS_WINDOW=window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages, **launch_args(q.device),
    )  # fmt: skip
    return out
