"""The paged prefill attention kernel against TorchOps.attention: one step mixing decode rows, whole
prompts and chunks after a cached prefix (block edges hit and missed), full and sliding windows across
block edges, GQA, shuffled block tables whose blocks outside every window are released, tile edges.

Every pool row the kernel must not read — released and unused blocks, rows past a sequence's end, and a
block just before the pool for a −1 table entry to land in — holds NaN; the reference runs on the clean
pool. Without a GPU in float32 in Triton's interpreter; on a GPU in bfloat16 against a float32 reference.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, so before import
pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it and triton does not declare it

from ossq.engine.batch import Batch, SeqChunk  # noqa: E402
from ossq.engine.kv import BLOCK_TOKENS  # noqa: E402
from ossq.engine.triton import prefill  # noqa: E402
from tests.test_triton_ops import CUDA, DEVICE, REF, TOL, activations, rel_err  # noqa: E402

# (cached positions, query rows): decode rows, whole prompts, chunks after prefixes on and off block edges
SEQS = [(0, 40), (3, 17), (16, 16), (50, 5), (50, 1), (0, 1), (16, 40), (3, 5), (100, 17)]


def prefill_batch(seqs: list[tuple[int, int]], *, window: int | None, seed: int) -> tuple[Batch, int, list[int]]:
    """The step writing each sequence's rows, its blocks scattered over a shuffled pool with 3 spare blocks;
    with a window, the blocks wholly before its first query's window are released (−1). → the batch, the
    pool's blocks, and the pool rows no query may read: those outside every sequence's visible keys."""
    need = [-(-(c + t) // BLOCK_TOKENS) for c, t in seqs]
    blocks = sum(need) + 3
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    chunks, used, unread = [], 0, set(range(blocks * BLOCK_TOKENS))
    for (cached, t), b in zip(seqs, need, strict=True):
        table = perm[used : used + b]
        used += b
        lo = 0 if window is None else max(0, cached - window + 1)  # the first query's first visible key
        table[: lo // BLOCK_TOKENS] = [-1] * (lo // BLOCK_TOKENS)
        unread -= {table[p // BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS for p in range(lo, cached + t)}
        chunks.append(SeqChunk([0] * t, cached, table))
    return Batch.build(chunks, device=DEVICE), blocks, sorted(unread)


def poisoned(pool: torch.Tensor, unread: list[int]) -> torch.Tensor:
    """`pool` with NaN in the rows `unread` and in a block just before its first row (where a −1 block id
    would point), as a view of one allocation."""
    full = torch.full((pool.shape[0] + BLOCK_TOKENS, *pool.shape[1:]), float("nan"), dtype=pool.dtype, device=DEVICE)
    view = full[BLOCK_TOKENS:]
    view.copy_(pool)
    view[unread] = float("nan")
    return view


def check(seqs, *, window: int | None, H: int, K: int, D: int, seed: int = 0, **tiles) -> None:
    batch, blocks, unread = prefill_batch(seqs, window=window, seed=seed)
    k_pool = activations(blocks * BLOCK_TOKENS, K, D, seed=seed + 1)
    v_pool = activations(blocks * BLOCK_TOKENS, K, D, seed=seed + 2)
    q, sinks = activations(batch.host_query_start[-1], H, D, seed=seed + 3), activations(H, seed=seed + 4)
    kw = dict(window=window, scale=D**-0.5)
    out = prefill.prefill(q, poisoned(k_pool, unread), poisoned(v_pool, unread), sinks, batch, **kw, **tiles)
    ref = REF.attention(q.float(), k_pool.float(), v_pool.float(), sinks.float(), batch, **kw)
    assert out.dtype == q.dtype and rel_err(out, ref) < TOL


@pytest.mark.parametrize("window", [None, 8, 20, 128])
@pytest.mark.parametrize("H, K", [(4, 4), (8, 4), (8, 2)], ids=["rep1", "rep2", "rep4"])
def test_prefill_equals_the_reference(window, H, K):
    # 16-row tiles (T = 17, 40, 5 end mid-tile); 32-position key steps, so a step aligned down from a
    # window's start begins in a block that may be released
    check(SEQS, window=window, H=H, K=K, D=16, seed=window or 0, block_m=16, block_n=32)


@pytest.mark.parametrize(
    "block_m, block_n, D, H, K, window",
    [
        (None, 64, 64, 8, 2, 20),  # the default tile: 128 // REP = 32 positions, gpt-oss's head dim
        (5, 16, 80, 6, 2, None),  # REP = 3 (15 rows padded to 16); a head dim that is no power of two
        (1, 16, 128, 4, 1, 8),  # one position a tile; the largest head dim
        (7, 32, 32, 2, 2, 33),
    ],
)
def test_prefill_tile_shapes(block_m, block_n, D, H, K, window):
    check(SEQS[::2], window=window, H=H, K=K, D=D, seed=D, block_m=block_m, block_n=block_n)


def test_the_work_list_is_built_once_per_batch():
    batch, _, _ = prefill_batch(SEQS, window=None, seed=0)
    work = prefill.work_list(batch, 16)
    assert prefill.work_list(batch, 16) is work  # every layer of the step reuses it
    assert prefill.work_list(batch, 8) is not work
    rows = work.cpu().tolist()
    assert sorted(r for _, r0, n, _ in rows for r in range(r0, r0 + n)) == list(range(batch.host_query_start[-1]))
    assert [n + p for _, _, n, p in rows] == sorted((n + p for _, _, n, p in rows), reverse=True)
    again, _, _ = prefill_batch(SEQS, window=None, seed=0)  # an equal batch is another step
    assert prefill.work_list(again, 16) is not prefill.work_list(batch, 16)


@pytest.mark.skipif(not CUDA, reason="gpt-oss shapes are too large for the interpreter")
@pytest.mark.parametrize("window", [None, 128])
def test_prefill_at_gpt_oss_shapes(window):
    seqs = [(0, 1000), (3000, 300), (200, 1), (128, 129), (77, 513)]
    check(seqs, window=window, H=64, K=8, D=64, seed=5)
