"""The grouped mixture of experts (moe.grouped_experts) against TorchOps' float32 experts, at awkward shapes:
one token, odd token counts, experts no token picks, every token on one expert, segments a multiple of the
row tile and not, outputs that are not a multiple of the tile, every bits × group size and MXFP4, gate/up
stored unlike down, biases on and off; a token's output independent of the rest of the step; and on a GPU
the step captured in a CUDA graph with no host synchronisation.

Without a GPU the kernels run in Triton's CPU interpreter in float32 (see tests/test_triton_ops.py); on a
GPU in bfloat16 against a float32 reference.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, so before import
pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it and triton does not declare it

from types import SimpleNamespace  # noqa: E402

from ossq.engine.triton import moe  # noqa: E402
from ossq.quant.spec import QuantSpec  # noqa: E402
from tests.test_triton_ops import (  # noqa: E402
    CUDA,
    DEVICE,
    INT_TOL,
    REF,
    SPECS,
    TOL,
    activations,
    as_float,
    quantized,
    rel_err,
    spec_id,
)

KW = dict(limit=7.0, alpha=1.702)
MXFP4 = QuantSpec(4, 32, "mxfp4")
PROJ = ("gate_proj", "up_proj", "down_proj")


def stack(gate_up: QuantSpec, down: QuantSpec, *, experts: int, hidden: int, inter: int, bias: bool):
    """gate/up (E, I, C) and down (E, C, I) stacks in the stored layout."""
    return SimpleNamespace(
        gate_proj=quantized(gate_up, (experts,), inter, hidden, bias=bias, seed=2),
        up_proj=quantized(gate_up, (experts,), inter, hidden, bias=bias, seed=3),
        down_proj=quantized(down, (experts,), hidden, inter, bias=bias, seed=4),
    )


def routing(tokens: int, experts: int, top_k: int, *, seed: int, same: int | None = None):
    """Distinct expert ids (N, k) per token (slot 0 = `same` for every token when given) and float32
    softmax weights (N, k)."""
    gen = torch.Generator().manual_seed(seed)
    score = torch.rand(tokens, experts, generator=gen)
    if same is not None:
        score[:, same] = 2.0
    top_i = score.argsort(1, descending=True)[:, :top_k]
    route = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1)
    return top_i.to(DEVICE), route.to(DEVICE)


def float_stack(st) -> SimpleNamespace:
    """The reference's float32 stacks; zero biases where the stack has none (TorchOps' experts assume one)."""

    def up(lin):
        lin = as_float(lin)
        if lin.bias is None:
            lin.bias = torch.zeros(lin.scales.shape[:2], device=DEVICE)
        return lin

    return SimpleNamespace(**{p: up(getattr(st, p)) for p in PROJ})


def check(st, tokens: int, top_k: int, *, seed: int = 0, same: int | None = None, **tiles) -> None:
    hidden, experts = st.down_proj.weight.shape[1], st.gate_proj.weight.shape[0]
    x = activations(tokens, hidden, seed=seed)
    top_i, route = routing(tokens, experts, top_k, seed=seed, same=same)
    out = moe.grouped_experts(x, st, top_i, route, **KW, **tiles)
    ref = REF._experts_grouped(x.float(), float_stack(st), top_i, route, **KW)
    assert out.dtype == x.dtype and rel_err(out, ref) < TOL


@pytest.mark.parametrize(
    "tokens, experts, top_k, block_m, same",
    [(1, 32, 4, 16, None), (17, 8, 2, 16, None), (100, 8, 4, 16, None), (64, 32, 4, 64, None), (17, 8, 2, 16, 3),
     (32, 8, 2, 16, 0), (3, 4, 4, 16, None)],
)  # fmt: skip
def test_sort_pairs_groups_the_pairs_by_expert_in_padded_segments(tokens, experts, top_k, block_m, same):
    top_i, _ = routing(tokens, experts, top_k, seed=tokens, same=same)
    P = tokens * top_k
    pairs, block_expert = moe.sort_pairs(top_i, experts, block_m)
    blocks = P // block_m + min(experts, P)
    assert pairs.shape == (blocks * block_m,) and block_expert.shape == (blocks,)
    real = pairs[pairs < P].long()
    assert torch.equal(real.sort().values, torch.arange(P, device=DEVICE))  # every pair once, the rest padding
    assert (pairs[pairs >= P] == P).all()
    assert (block_expert[1:] >= block_expert[:-1]).all()
    ids = top_i.reshape(-1)
    counts = torch.bincount(ids, minlength=experts)  # (the test, unlike the kernels, may read the routing back)
    for b, e in enumerate(block_expert.tolist()):
        rows = pairs[b * block_m : (b + 1) * block_m]
        if e == experts:
            assert (rows == P).all()  # past the last segment: skipped
            continue
        hit = rows[rows < P].long()
        assert (ids[hit] == e).all() and hit.numel() > 0
        assert torch.equal(hit, rows[: hit.numel()].long())  # the padding follows the pairs
        assert torch.equal(hit, hit.sort().values)  # stable: token order kept
    used = torch.bincount(block_expert, minlength=experts + 1)[:experts]
    assert torch.equal(used, (counts + block_m - 1) // block_m)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_grouped_experts_for_every_bits_and_group_size(spec):
    # gate/up in `spec`, down in another spec (each spec is down once too); the shapes, biases and the code
    # decoding (float bits or integers) rotate through the specs.
    i = SPECS.index(spec)
    st = stack(spec, SPECS[(i + 5) % len(SPECS)], experts=8 if i % 2 else 32, hidden=128, inter=128, bias=i % 2 == 0)
    tokens, top_k = [(3, 2), (17, 4), (1, 4)][i % 3]
    check(st, tokens, top_k, seed=i, magic=i % 3 != 2)


@pytest.mark.parametrize(
    "tokens, experts, top_k, block_m, bias",
    [(1, 8, 4, None, True), (3, 32, 2, None, False), (17, 8, 2, 16, True), (64, 32, 4, None, True),
     (100, 8, 4, None, False), (100, 8, 2, 64, True)],
)  # fmt: skip
def test_grouped_experts_at_awkward_shapes(tokens, experts, top_k, block_m, bias):
    # I = 96: the second 64-wide output tile of gate/up half masked; most of 32 experts hit by no token
    st = stack(QuantSpec(6, 32), MXFP4, experts=experts, hidden=64, inter=96, bias=bias)
    check(st, tokens, top_k, seed=tokens, block_m=block_m)


@pytest.mark.parametrize("tokens, block_m", [(16, 16), (17, 16), (64, 64), (65, 64)])
def test_grouped_experts_with_every_token_on_one_expert(tokens, block_m):
    # expert 5's segment exactly one, two or more blocks, or one row into the next
    st = stack(QuantSpec(4, 64), QuantSpec(4, 64), experts=8, hidden=64, inter=64, bias=True)
    check(st, tokens, 2, seed=1, same=5, block_m=block_m)


@pytest.mark.parametrize("block_m", [None, 64])
def test_a_token_does_not_depend_on_the_rest_of_the_step(block_m):
    # The interpreter's tl.dot is numpy's matmul, whose BLAS rounds a row by its place in the tile: there
    # only token 0 is compared, whose pairs are row 0 of their blocks (the sort is stable) as when alone.
    st = stack(MXFP4, QuantSpec(4, 32), experts=8, hidden=64, inter=64, bias=True)
    x = activations(40, 64, seed=5)
    top_i, route = routing(40, 8, 2, seed=5)
    batch = moe.grouped_experts(x, st, top_i, route, **KW, block_m=block_m)
    for t in (0, 7, 39) if CUDA else (0,):
        alone = moe.grouped_experts(x[t : t + 1], st, top_i[t : t + 1], route[t : t + 1], **KW, block_m=block_m)
        assert torch.equal(alone[0], batch[t]), t


@pytest.mark.skipif(not CUDA, reason="20b shapes are too large for the interpreter")
@pytest.mark.parametrize("spec", [MXFP4, QuantSpec(4, 64), QuantSpec(8, 64)], ids=spec_id)
def test_grouped_experts_in_bfloat16_at_20b_shapes(spec):
    st = stack(spec, spec, experts=32, hidden=2880, inter=2880, bias=True)
    for tokens in (1, 16, 256, 2048):  # decode-sized (16-row tiles) to prefill-sized (64-row tiles)
        check(st, tokens, 4, seed=tokens)


def check_pairs(st, tokens: int, top_k: int, *, seed: int = 0, tol: float = TOL, **kernels) -> None:
    """The per-pair kernels (moe.experts, decode-sized steps) against the reference on the same routing."""
    hidden, experts = st.down_proj.weight.shape[1], st.gate_proj.weight.shape[0]
    x = activations(tokens, hidden, seed=seed)
    top_i, route = routing(tokens, experts, top_k, seed=seed)
    out = moe.experts(x, st, top_i, route, **KW, **kernels)
    ref = REF._experts_grouped(x.float(), float_stack(st), top_i, route, **KW)
    assert out.dtype == x.dtype and rel_err(out, ref) < tol


@pytest.mark.parametrize("spec", [MXFP4, QuantSpec(4, 64), QuantSpec(8, 32), QuantSpec(6, 32)], ids=spec_id)
@pytest.mark.parametrize("int_dot", [None, True], ids=["dot-default", "dot-on"])
def test_per_pair_experts_at_awkward_shapes(spec, int_dot):
    # gate and up streamed in one K loop, down one program per pair (the k partials summed by the last to
    # arrive): K over several steps (block_k 64 < 160), outputs off the tile (C = 160 over 8-row tiles,
    # I = 96), 3 tokens × 2 of 5 experts.
    st = stack(spec, spec, experts=5, hidden=160 if spec.group_size == 32 else 192, inter=96 if spec.group_size == 32
               else 128, bias=True)  # fmt: skip
    for tokens in (1, 3):
        check_pairs(st, tokens, 2, seed=tokens, tol=INT_TOL if int_dot else TOL, block_k=64, int_dot=int_dot)


@pytest.mark.skipif(not CUDA, reason="20b shapes are too large for the interpreter")
@pytest.mark.parametrize("spec", [MXFP4, QuantSpec(4, 64), QuantSpec(8, 64)], ids=spec_id)
def test_per_pair_experts_in_bfloat16_at_20b_shapes(spec):
    st = stack(spec, spec, experts=32, hidden=2880, inter=2880, bias=True)
    for tokens in (1, 8):
        check_pairs(st, tokens, 4, seed=tokens)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_grouped_experts_replays_in_a_cuda_graph_without_a_host_sync():
    st = stack(MXFP4, MXFP4, experts=32, hidden=512, inter=256, bias=True)
    static_x, (static_i, static_route) = activations(64, 512, seed=1), routing(64, 32, 4, seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernels outside the capture
        moe.grouped_experts(static_x, st, static_i, static_route, **KW)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.grouped_experts(static_x, st, static_i, static_route, **KW)
    for seed, same in [(2, None), (3, 3)]:  # new routing, then every token on expert 3
        x = activations(64, 512, seed=seed)
        top_i, route = routing(64, 32, 4, seed=seed, same=same)
        static_x.copy_(x)
        static_i.copy_(top_i)
        static_route.copy_(route)
        graph.replay()
        torch.cuda.set_sync_debug_mode("error")
        try:
            eager = moe.grouped_experts(x, st, top_i, route, **KW)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(out, eager), seed


def rank_share(st, first: int, n: int) -> SimpleNamespace:
    """Experts first … first + n of a stack, as a tensor-parallel rank holds them (engine/parallel.py)."""

    def cut(lin):
        part = {f: None if getattr(lin, f) is None else getattr(lin, f)[first : first + n].contiguous()
                for f in ("weight", "scales", "biases", "bias")}  # fmt: skip
        return SimpleNamespace(spec=lin.spec, **part)

    return SimpleNamespace(first=first, **{p: cut(getattr(st, p)) for p in PROJ})


@pytest.mark.parametrize("tokens", [1, 3, 40])  # the per-pair kernels (≤ MOE_MAX_PAIRS pairs) and the grouped
def test_a_rank_with_some_of_the_experts_adds_exactly_their_share(tokens):
    # Two ranks of 4 experts each: each rank's output is the sum over its own experts' pairs only, and the
    # two shares add up to the whole stack's output.
    from ossq.engine.ops import local_experts

    st = stack(MXFP4, QuantSpec(4, 32), experts=8, hidden=64, inter=64, bias=True)
    x = activations(tokens, 64, seed=tokens)
    top_i, route = routing(tokens, 8, 4, seed=tokens)
    whole = REF._experts_grouped(x.float(), float_stack(st), top_i, route, **KW)
    shares = []
    for first in (0, 4):
        share = rank_share(st, first, 4)
        ids, weights = local_experts(top_i, route, share, 8)
        assert ((ids == -1) == ((top_i < first) | (top_i >= first + 4))).all()
        mine = route * (ids >= 0)
        ref = REF._experts_grouped(x.float(), float_stack(st), top_i, mine, **KW)
        run = moe.experts(x, share, ids, weights, **KW) if tokens < 40 else None
        grouped = moe.grouped_experts(x, share, ids, weights, **KW, partial=True)
        for out in (run, grouped):
            if out is not None:
                assert rel_err(out, ref) < TOL
        shares.append(grouped.float())
    assert rel_err(shares[0] + shares[1], whole) < TOL


def test_sort_pairs_leaves_out_the_pairs_of_another_ranks_experts():
    top_i, _ = routing(9, 8, 4, seed=2)
    ids = torch.where(top_i >= 4, -1, top_i)  # a rank holding experts 0 … 3
    pairs, block_expert = moe.sort_pairs(ids, 4, 16)
    P = ids.numel()
    kept = pairs[pairs < P].long()
    assert torch.equal(kept.sort().values, (ids.reshape(-1) >= 0).nonzero()[:, 0])
    for b, e in enumerate(block_expert.tolist()):
        rows = pairs[b * 16 : (b + 1) * 16]
        assert e == 4 and (rows == P).all() or (ids.reshape(-1)[rows[rows < P].long()] == e).all()
