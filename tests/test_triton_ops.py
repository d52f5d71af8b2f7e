"""The Triton ops against their torch twin (TorchOps), at awkward shapes: one row, odd row counts, outputs
that are not a multiple of the tile, every bits × group size and MXFP4, split K, expert stacks with
experts no token picks, sequences of different lengths across block and window edges, released blocks;
and end to end, a quantized model through the engine gives TorchOps' greedy tokens and logits.

Without a GPU the kernels run in Triton's CPU interpreter in float32 (its bfloat16 arithmetic is broken,
shared spec offline.md §5); on a GPU in bfloat16 against a float32 reference.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, so before import
pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it and triton does not declare it

from collections import Counter  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from ossq.engine.batch import Batch, SeqChunk  # noqa: E402
from ossq.engine.engine import Engine, EngineConfig  # noqa: E402
from ossq.engine.kv import BLOCK_TOKENS  # noqa: E402
from ossq.engine.model import GptOss, Linear  # noqa: E402
from ossq.engine.ops import TorchOps, rope, select_ops  # noqa: E402
from ossq.engine.triton import attention, fused, moe, prefill, qmm  # noqa: E402
from ossq.engine.triton.ops import MOE_MAX_PAIRS, TritonOps, relayout  # noqa: E402
from ossq.quant import affine, mxfp4  # noqa: E402
from ossq.quant.spec import QuantSpec  # noqa: E402
from tests.conftest import random_model, small_config  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 1e-2 if CUDA else 1e-5  # ‖out − ref‖ / ‖ref‖ against a float32 reference
SPECS = [QuantSpec(b, g) for b in affine.BITS for g in affine.GROUP_SIZES] + [QuantSpec(4, 32, "mxfp4")]
REF = TorchOps()


def spec_id(spec: QuantSpec) -> str:
    return "mxfp4" if spec.mode == "mxfp4" else f"{spec.bits}b-g{spec.group_size}"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def quantized(spec: QuantSpec | None, lead: tuple[int, ...], n: int, k: int, *, bias: bool, seed: int):
    """A random linear (stack) in the stored layout, as a QuantizedWeight, on DEVICE in DTYPE."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    w = torch.randn(*lead, n, k, generator=gen, device=DEVICE) * k**-0.5
    b = 0.1 * torch.randn(*lead, n, generator=gen, device=DEVICE) if bias else None
    weight, scales, biases = w, None, None
    if spec is not None and spec.mode == "mxfp4":
        weight, scales = mxfp4.quantize(w)
    elif spec is not None:
        weight, scales, biases = affine.quantize(w.to(DTYPE), bits=spec.bits, group_size=spec.group_size)

    def put(t):
        return None if t is None else t.to(DEVICE, DTYPE if t.is_floating_point() else t.dtype)

    return SimpleNamespace(spec=spec, weight=put(weight), scales=put(scales), biases=put(biases), bias=put(b))


def as_float(lin) -> SimpleNamespace:
    """The same stored weight with float32 scales, biases and bias: the reference's upcast inputs."""

    def up(t):
        return None if t is None or not t.is_floating_point() else t.float()

    scales = lin.scales if lin.spec is not None and lin.spec.mode == "mxfp4" else up(lin.scales)
    return SimpleNamespace(spec=lin.spec, weight=lin.weight, scales=scales, biases=up(lin.biases), bias=up(lin.bias))


def activations(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, DTYPE)


# ------------------------------------------------------------------------------------------ quantized matmul


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_qmm_equals_the_dequantized_matmul_for_every_bits_and_group_size(spec):
    # K = 384: three g128 groups, one and a half 256-wide steps (the last step half masked); N = 37 rows.
    for rows, bias in [(1, True), (5, False)]:  # the reduce kernel and the tensor-core kernel
        lin = quantized(spec, (), 37, 384, bias=bias, seed=spec.bits * 1000 + spec.group_size)
        x = activations(rows, 384, seed=rows)
        out = qmm.qmm(x, lin.weight, lin.scales, lin.biases, lin.bias, spec)
        assert out.dtype == x.dtype
        assert rel_err(out, REF.linear(x.float(), as_float(lin))) < TOL, (rows, bias)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(5, 32), QuantSpec(4, 32, "mxfp4")], ids=spec_id)
@pytest.mark.parametrize("rows", [1, 2, 17, 64])
def test_qmm_split_k_and_tile_edges(spec, rows):
    # N = 33 (one full 16-row tile + 1), K = 320 split three ways: splits of unequal length. Odd row
    # counts decode the codes by integer conversion, even ones through float bits (Tiles.magic).
    for n, split, bias in [(33, 3, True), (1, 2, False), (70, 1, True)]:
        lin = quantized(spec, (), n, 320, bias=bias, seed=rows + n)
        x = activations(rows, 320, seed=rows)
        block_m = 16 if rows <= 16 else 64
        tiles = qmm.Tiles(block_n=16, block_k=64, block_m=block_m, split_k=split, magic=rows % 2 == 0)
        out = qmm.qmm(x, lin.weight, lin.scales, lin.biases, lin.bias, spec, tiles=tiles)
        assert rel_err(out, REF.linear(x.float(), as_float(lin))) < TOL, (n, split)


INT_SPECS = [QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 128), QuantSpec(8, 64), QuantSpec(4, 32, "mxfp4")]
INT_TOL = 1e-2 if CUDA else 2e-4  # x as int16 codes: 15 bits a group, more than bfloat16's 8


@pytest.mark.parametrize("spec", INT_SPECS, ids=spec_id)
def test_one_row_integer_dot_equals_the_dequantized_matmul(spec):
    # x rounded to int16 per group and multiplied in integer dot products (qmm.Tiles.int_dot, dp2a on the
    # GPU, the same integers emulated in the interpreter): N = 33, K = 384 in 128-wide steps, split three
    # ways and not; an all-zero group of x; affine scales of both signs.
    x = activations(1, 384, seed=11)
    x[0, 128:256] = 0
    for n, split, bias in [(33, 3, True), (70, 1, False)]:
        lin = quantized(spec, (), n, 384, bias=bias, seed=n + spec.group_size)
        if lin.biases is not None:
            lin.scales[::3] *= -1  # what the layout allows: a negated scale and its bias, the same codes
            lin.biases[::3] = -lin.biases[::3]
        tiles = qmm.Tiles(block_n=8, block_k=128, num_warps=2, split_k=split, int_dot=True)
        out = qmm.qmm(x, lin.weight, lin.scales, lin.biases, lin.bias, spec, tiles=tiles)
        assert rel_err(out, REF.linear(x.float(), as_float(lin))) < INT_TOL, (n, split)


def test_mxfp4_one_row_decode_is_exact_for_every_code_scale_and_activation_size():
    """Every E2M1 code (both signs, the subnormal ±0.5) under scale bytes from 0 (2^−127) to 2^8, against
    activations of both signs from 1e-13 to 1e3, through the one-row kernel's decode from float bits
    (values of order 2^−126, qmm._e2m1_row_dot): the products lose nothing, the sums are float32's."""
    n, k = 16, 256
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    codes[0, :16] = torch.arange(16, dtype=torch.uint8)
    weight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous().view(torch.int32)  # low nibble first
    scales = torch.randint(100, 136, (n, k // 32), generator=gen, dtype=torch.uint8)
    scales[0, 0], scales[1] = 0, 135
    sign = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)
    w = mxfp4.decode(weight, scales, dtype=torch.float32).double()
    for low, high in [(-6, 3), (-13, -6)]:  # the second: products that would be float32 subnormals
        x = sign * 10 ** (torch.rand(k, generator=gen) * (high - low) + low)
        ref = w @ x.double()
        out = qmm.qmm(x[None].to(DEVICE), weight.to(DEVICE), scales.to(DEVICE), None, None, QuantSpec(4, 32, "mxfp4"),
                      tiles=qmm.Tiles(block_n=4, block_k=256, magic=True))[0].double().cpu()  # fmt: skip
        assert ((out - ref).abs() / (w.abs() @ x.double().abs())).max() < 1e-6, (low, high)


def test_triton_linear_keeps_leading_axes_and_runs_prefill_sized_row_counts():
    ops, spec = TritonOps(), QuantSpec(4, 32)
    lin = quantized(spec, (), 24, 64, bias=True, seed=7)
    x = activations(2, 3, 64, seed=3)
    assert rel_err(ops.linear(x, lin), REF.linear(x.float(), as_float(lin))) < TOL
    big = activations(150, 64, seed=4)  # prefill-sized: 64-row tensor-core tiles, the last one partial
    assert rel_err(ops.linear(big, lin), REF.linear(big.float(), as_float(lin))) < TOL
    plain = quantized(None, (), 24, 64, bias=True, seed=8)  # unquantized: F.linear
    assert torch.equal(ops.linear(x, plain), REF.linear(x, plain))


@pytest.mark.skipif(not CUDA, reason="20b shapes are too large for the interpreter")
@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(8, 64), QuantSpec(4, 32, "mxfp4")], ids=spec_id)
def test_qmm_at_20b_shapes(spec):
    for n, rows in [(5760, 1), (2880, 1), (50_003, 1), (2880, 7), (5120, 64)]:  # 50,003: an lm_head-like edge
        lin = quantized(spec, (), n, 2880, bias=n != 50_003, seed=n)
        x = activations(rows, 2880, seed=rows)
        assert rel_err(qmm.qmm(x, lin.weight, lin.scales, lin.biases, lin.bias, spec),
                       REF.linear(x.float(), as_float(lin))) < TOL, (n, rows)  # fmt: skip


# ------------------------------------------------------------------------------------------ the small fused ops


@pytest.mark.parametrize("rows, width", [(1, 64), (5, 2880), (3, 100)])
def test_rms_norm_and_the_residual_add_equal_the_reference(rows, width):
    x, delta = activations(rows, width, seed=1), activations(rows, width, seed=2)
    weight = activations(width, seed=3).float()
    ref_total, ref = REF.add_rms_norm(x, delta, weight, 1e-5)
    total, out = TritonOps().add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, ref_total)  # the sum is rounded to x's dtype exactly as torch rounds it
    assert out.dtype == x.dtype and rel_err(out, ref) < (TOL if CUDA else 1e-6)
    assert rel_err(TritonOps().rms_norm(x, weight, 1e-5), REF.rms_norm(x, weight, 1e-5)) < TOL


def test_rope_and_store_rotates_q_and_k_and_writes_the_pool():
    N, H, K, D = 5, 6, 2, 16
    qkv = activations(N, (H + 2 * K) * D, seed=1)  # q, k, v as views of one fused projection
    q, k, v = (t.view(N, -1, D) for t in qkv.split([H * D, K * D, K * D], dim=-1))
    angles = activations(N, D // 2, seed=2)
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([7, 0, 31, 12, 13], device=DEVICE)
    pools = [activations(32, K, D, seed=s) for s in (3, 4, 3, 4)]
    ref_q = REF.rope_and_store(q, k, v, cos, sin, pools[0], pools[1], slots)
    out_q = TritonOps().rope_and_store(q, k, v, cos, sin, pools[2], pools[3], slots)
    assert torch.equal(ref_q, rope(q, cos, sin))
    assert torch.equal(out_q, ref_q) if not CUDA else rel_err(out_q, ref_q) < TOL  # bf16 on the GPU: an ulp apart
    for out, ref in zip(pools[2:], pools[:2], strict=True):  # every row, the untouched ones too
        assert torch.equal(out, ref) if not CUDA else rel_err(out, ref) < TOL


@pytest.mark.parametrize("experts, top_k", [(32, 4), (6, 2), (128, 4), (5, 3)])
def test_route_picks_the_top_k_and_softmaxes_them(experts, top_k):
    logits = activations(9, experts, seed=experts)
    ids, weights = fused.route(logits, top_k)
    top_v, top_i = torch.topk(logits, top_k, dim=-1)
    assert torch.equal(ids, top_i)
    assert rel_err(weights, torch.softmax(top_v.float(), dim=-1)) < 1e-6


@pytest.mark.parametrize(
    "spec, experts, top_k, tokens, bias",
    [
        (QuantSpec(8, 64), 32, 4, 1, True),  # the 20b's router, one decode token
        (QuantSpec(6, 32), 6, 2, 3, False),  # straddling codes, no bias
        (QuantSpec(4, 32, "mxfp4"), 128, 4, 2, True),
        (QuantSpec(3, 32), 5, 3, 1, True),
    ],
    ids=["8b-g64", "6b-g32", "mxfp4", "3b-g32"],
)
def test_router_gemv_routes_as_the_router_linear_then_top_k(spec, experts, top_k, tokens, bias):
    # hidden 192 in K steps of 128: two splits per token, the last one half masked
    router = quantized(spec, (), experts, 192, bias=bias, seed=experts)
    x = activations(tokens, 192, seed=tokens)
    ids, weights = moe.route(x, router, top_k, block_k=128)
    logits = REF.linear(x.float(), as_float(router))
    top_v, top_i = torch.topk(logits, top_k, dim=-1)
    chosen = logits.gather(-1, ids)
    if CUDA:  # bfloat16 logits: a near tie may go either way, but only between logits that close
        assert (chosen - top_v).abs().max() < 0.02 * top_v.abs().max()
    else:
        assert torch.equal(ids, top_i)
    assert rel_err(weights, torch.softmax(chosen, dim=-1)) < TOL


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_the_embedding_decodes_only_the_gathered_rows_as_the_reference_does(spec):
    # 50 rows of 384: a K step and a half; ids (2, 3) with a repeat and the last row, a partial row tile
    emb = quantized(spec, (), 50, 384, bias=False, seed=spec.bits * 100 + spec.group_size)
    ids = torch.tensor([[0, 49, 7], [7, 13, 2]], device=DEVICE)
    out = TritonOps().embedding(ids, emb, DTYPE)
    ref = REF.embedding(ids, emb, DTYPE)
    assert out.shape == (2, 3, 384) and out.dtype == DTYPE
    assert rel_err(out, ref) < (TOL if CUDA else 1e-6)


def test_prepare_stacks_q_k_v_into_one_weight_held_once():
    source, ops = random_model(small_config(num_hidden_layers=1)), TritonOps()
    model = quantized_model(source, e2e_specs(source), ops)
    attn = model.model.layers[0].self_attn
    lins = (attn.q_proj, attn.k_proj, attn.v_proj)
    (stacked,) = ops._fused.values()
    assert lins[1].weight.data_ptr() == stacked.weight[lins[0].weight.shape[0]].data_ptr()  # a view, not a copy
    x = activations(3, model.config.hidden_size, seed=1)
    for out, lin in zip(ops.linears(x, lins), lins, strict=True):  # split K may differ: rounding apart
        assert rel_err(out, REF.linear(x.float(), as_float(lin))) < TOL


# ------------------------------------------------------------------------------------------ mixture of experts


def moe_weights(gate_up: QuantSpec | None, down: QuantSpec | None, *, experts: int, hidden: int, inter: int):
    make = quantized
    return SimpleNamespace(
        router=make(QuantSpec(8, 32), (), experts, hidden, bias=True, seed=1),
        experts=SimpleNamespace(
            gate_proj=make(gate_up, (experts,), inter, hidden, bias=True, seed=2),
            up_proj=make(gate_up, (experts,), inter, hidden, bias=True, seed=3),
            down_proj=make(down, (experts,), hidden, inter, bias=True, seed=4),
        ),
    )


def float_moe(mlp) -> SimpleNamespace:
    e = mlp.experts
    return SimpleNamespace(
        router=as_float(mlp.router),
        experts=SimpleNamespace(gate_proj=as_float(e.gate_proj), up_proj=as_float(e.up_proj),
                                down_proj=as_float(e.down_proj)),
    )  # fmt: skip


@pytest.mark.parametrize(
    "gate_up, down, inter",
    [
        (QuantSpec(4, 32, "mxfp4"), QuantSpec(4, 32, "mxfp4"), 96),
        (QuantSpec(4, 64), QuantSpec(4, 64), 128),
        (QuantSpec(6, 32), QuantSpec(3, 32), 96),  # straddling codes; down stored unlike gate/up
    ],
    ids=["mxfp4", "4b-g64", "6b-3b"],
)
@pytest.mark.parametrize("tokens", [1, 3])
def test_moe_decode_equals_the_reference(gate_up, down, inter, tokens):
    # 6 experts, top 2 of them: most experts are hit by no token; the pairs read only their own expert.
    mlp = moe_weights(gate_up, down, experts=6, hidden=64, inter=inter)
    x = activations(tokens, 64, seed=tokens)
    kw = dict(top_k=2, limit=7.0, alpha=1.702)
    out = TritonOps().moe(x, mlp, **kw)
    ref = REF.moe(x.float(), float_moe(mlp), **kw)
    assert out.dtype == x.dtype and rel_err(out, ref) < TOL


@pytest.mark.parametrize("gate_up, down", [(QuantSpec(4, 32, "mxfp4"),) * 2, (QuantSpec(4, 64), QuantSpec(8, 64))],
                         ids=["mxfp4", "4b-8b"])  # fmt: skip
def test_moe_decode_through_integer_dots_equals_the_reference(gate_up, down, monkeypatch):
    forced = qmm.int_dot_mode
    monkeypatch.setattr(moe, "int_dot_mode", lambda flag, dtype, spec, device: forced(True, dtype, spec, device))
    mlp = moe_weights(gate_up, down, experts=6, hidden=64, inter=128)
    x = activations(2, 64, seed=4)
    kw = dict(top_k=2, limit=7.0, alpha=1.702)
    assert rel_err(TritonOps().moe(x, mlp, **kw), REF.moe(x.float(), float_moe(mlp), **kw)) < INT_TOL


def test_moe_beyond_the_gathered_pairs_takes_the_grouped_kernels(monkeypatch):
    calls: Counter[str] = Counter()
    monkeypatch.setattr(moe, "grouped_experts", counted(moe.grouped_experts, "grouped", calls))
    mlp = moe_weights(QuantSpec(4, 32, "mxfp4"), QuantSpec(4, 32, "mxfp4"), experts=4, hidden=64, inter=64)
    x = activations(MOE_MAX_PAIRS // 2 + 1, 64, seed=0)
    kw = dict(top_k=2, limit=7.0, alpha=1.702)
    assert rel_err(TritonOps().moe(x, mlp, **kw), REF.moe(x.float(), float_moe(mlp), **kw)) < TOL
    assert calls["grouped"] == 1


# ------------------------------------------------------------------------------------------ decode attention

LENGTHS = [1, 15, 16, 17, 40, 129]  # one token; block edges; past a 33-token window; 9 blocks


def decode_batch(lengths: list[int], *, release_before: int | None = None, seed: int = 0):
    """One decode token per sequence, its blocks scattered over a shuffled pool; with `release_before`,
    blocks wholly before each sequence's last `release_before` positions are released (−1)."""
    need = [-(-n // BLOCK_TOKENS) for n in lengths]
    perm = torch.randperm(sum(need) + 3, generator=torch.Generator().manual_seed(seed)).tolist()
    chunks, used = [], 0
    for n, b in zip(lengths, need, strict=True):
        table = perm[used : used + b]
        used += b
        if release_before is not None:
            first = max(0, n - release_before) // BLOCK_TOKENS
            table = [-1] * first + table[first:]
        chunks.append(SeqChunk([0], n - 1, table))
    return Batch.build(chunks, device=DEVICE), sum(need) + 3


@pytest.mark.parametrize("window", [None, 8, 16, 33])
@pytest.mark.parametrize("split", [None, (4, 32), (16, 32), (3, 64)])  # (splits, min_split); 16: empty splits
def test_decode_attention_equals_the_reference(window, split):
    H, K, D = 6, 2, 16  # three query heads per kv head (not a power of two)
    batch, blocks = decode_batch(LENGTHS, release_before=window, seed=window or 0)
    k_pool = activations(blocks * BLOCK_TOKENS, K, D, seed=1)
    v_pool = activations(blocks * BLOCK_TOKENS, K, D, seed=2)
    q, sinks = activations(len(LENGTHS), H, D, seed=3), activations(H, seed=4)
    splits, min_split = split or (None, attention.MIN_SPLIT_TOKENS)
    kw = dict(window=window, scale=0.3)
    out = attention.decode(q, k_pool, v_pool, sinks, batch, **kw, splits=splits, min_split=min_split)
    ref = REF.attention(q.float(), k_pool.float(), v_pool.float(), sinks.float(), batch, **kw)
    assert out.dtype == q.dtype and rel_err(out, ref) < TOL


def test_attention_with_a_prefill_chunk_takes_the_prefill_kernel(monkeypatch):
    chunks = [SeqChunk([1, 2, 3], 0, [0]), SeqChunk([4], 20, [1, 2])]
    batch = Batch.build(chunks, device=DEVICE)
    pools = [activations(3 * BLOCK_TOKENS, 2, 16, seed=s) for s in (1, 2)]
    q, sinks = activations(4, 4, 16, seed=3), activations(4, seed=4)
    calls: Counter[str] = Counter()
    monkeypatch.setattr(prefill, "prefill", counted(prefill.prefill, "prefill", calls))
    out = TritonOps().attention(q, *pools, sinks, batch, window=8, scale=0.25)
    ref = REF.attention(q.float(), *(p.float() for p in pools), sinks.float(), batch, window=8, scale=0.25)
    assert calls["prefill"] == 1 and rel_err(out, ref) < TOL


# ------------------------------------------------------------------------------------------ end to end


def quantized_model(source: GptOss, specs: dict[str, QuantSpec], ops) -> GptOss:
    """`source`'s weights stored as `specs` say (MLX layout), in a float32 GptOss on DEVICE that runs on `ops`."""
    model = GptOss(source.config, specs, dtype=torch.float32, ops=ops).eval()
    src = dict(source.named_buffers())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if not name.endswith(("weight", "scales", "biases")) or name.rsplit(".", 1)[0] not in specs:
                buf.copy_(src[name])
        for path, spec in specs.items():
            mod: Linear = model.get_submodule(path)
            w = src[f"{path}.weight"]
            if spec.mode == "mxfp4":
                for buf, t in zip((mod.weight, mod.scales), mxfp4.quantize(w), strict=True):
                    buf.copy_(t)
            else:
                stored = affine.quantize(w, bits=spec.bits, group_size=spec.group_size)
                for buf, t in zip((mod.weight, mod.scales, mod.biases), stored, strict=True):
                    buf.copy_(t)
    model = model.to(DEVICE)
    ops.prepare(model)
    return model


def e2e_specs(model: GptOss) -> dict[str, QuantSpec]:
    """MXFP4 experts, 8-bit routers, 6-bit attention (straddling codes), 4-bit g64 lm_head; the embedding
    stays float."""
    specs = {"lm_head": QuantSpec(4, 64)}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}"
        specs |= {f"{p}.mlp.experts.{n}": QuantSpec(4, 32, "mxfp4") for n in ("gate_proj", "up_proj", "down_proj")}
        specs |= {f"{p}.self_attn.{n}": QuantSpec(6, 32) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        specs[f"{p}.mlp.router"] = QuantSpec(8, 32)
    return specs


def generate(
    model: GptOss, prompts: list[list[int]], max_tokens: int, **config
) -> tuple[list[list[int]], torch.Tensor]:
    defaults = {"kv_cache_tokens": 256, "prefix_cache": False, "cuda_graphs": False}
    engine = Engine(model, EngineConfig(**defaults | config))
    ids = [engine.add_request(p, max_tokens=max_tokens, logits_from=len(p) - 1) for p in prompts]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in ids}
    while engine.has_unfinished:
        for out in engine.step():
            if out.token is not None:
                tokens[out.request_id].append(out.token)
            if out.logits is not None:
                logits[out.request_id].append(out.logits.float().cpu())
    return [tokens[i] for i in ids], torch.cat([torch.cat(logits[i]) for i in ids])


def test_quantized_model_through_the_engine_matches_torch_ops(monkeypatch):
    # float32 on the GPU too, so that greedy ties cannot flip; bfloat16 is the op tests' business
    calls: Counter[str] = Counter()
    kernels = [(qmm, "qmm"), (moe, "experts"), (moe, "grouped_experts"), (attention, "decode"), (prefill, "prefill")]
    kernels.append((fused, "rope_and_store"))
    for module, name in kernels:
        monkeypatch.setattr(module, name, counted(getattr(module, name), name, calls))
    source = random_model(small_config(num_hidden_layers=2))  # one sliding and one full layer
    specs = e2e_specs(source)
    # three sequences decode together; the second runs past the 8-token window
    prompts = [[5, 9, 200, 7, 1], list(range(30, 42)), [100, 101, 102]]
    ref_tokens, ref_logits = generate(quantized_model(source, specs, TorchOps()), prompts, max_tokens=4)
    assert not calls
    tokens, logits = generate(quantized_model(source, specs, select_ops("triton")), prompts, max_tokens=4)
    assert tokens == ref_tokens
    assert rel_err(logits, ref_logits) < 1e-4
    assert all(calls[name] for _, name in kernels), calls  # every kernel ran


def test_relayout_repacks_straddling_widths_and_changes_no_output():
    source = random_model(small_config(num_hidden_layers=2))
    specs = e2e_specs(source)  # 6-bit attention
    for i in range(2):
        specs |= {f"model.layers.{i}.mlp.experts.{n}": QuantSpec(3, 32) for n in ("gate_proj", "up_proj", "down_proj")}
    specs["lm_head"] = QuantSpec(5, 64)
    model = quantized_model(source, specs, TorchOps()).cpu()
    ids = [[5, 9, 200, 7, 1, 3]]
    before = generate(model, ids, 4)
    stored = {path: model.get_submodule(path).weight.nbytes for path in specs}
    assert not relayout(model, free_bytes=0)  # no room: nothing changes
    assert relayout(model, free_bytes=1 << 40)
    widths = {path: model.get_submodule(path).spec.bits for path in specs}
    assert widths["lm_head"] == 8 and widths["model.layers.0.mlp.experts.down_proj"] == 4
    assert widths["model.layers.1.self_attn.q_proj"] == 8 and widths["model.layers.0.mlp.router"] == 8
    assert model.get_submodule("lm_head").weight.nbytes == stored["lm_head"] * 8 // 5
    after = generate(model, ids, 4)
    assert after[0] == before[0] and torch.equal(after[1], before[1])  # the same codes, scales and biases


def counted(fn, name: str, calls: Counter):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------ CUDA graphs

needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def graph_models():
    """A quantized 2-layer model on the fast path and the same weights on the reference path, float32 (so
    greedy ties cannot flip between them)."""
    source = random_model(small_config(num_hidden_layers=2))
    specs = e2e_specs(source)
    return quantized_model(source, specs, TritonOps()), quantized_model(source, specs, TorchOps())


@needs_cuda
def test_graph_replayed_decode_equals_eager_decode(graph_models):
    fast, _ = graph_models
    prompts = [[5, 9, 200, 7, 1], list(range(30, 42)), [100, 101, 102]]  # 3 rows: padded to the 4-row graph
    eager = generate(fast, prompts, 24)
    engine_tokens, engine_logits = generate(fast, prompts, 24, cuda_graphs=True)
    assert engine_tokens == eager[0]
    assert rel_err(engine_logits, eager[1]) < 1e-5


@needs_cuda
def test_a_prompt_replayed_as_graph_rows_gives_the_eager_tokens_and_logits(graph_models):
    fast, _ = graph_models
    prompt = [[(13 * j + 5) % 500 for j in range(90)]]  # 90 one-token rows: the 128-row graph
    eager = generate(fast, prompt, 8, kv_cache_tokens=512)
    engine = Engine(fast, EngineConfig(kv_cache_tokens=512, prefix_cache=False))
    engine.add_request(prompt[0], max_tokens=8)
    engine.step()
    assert [rows for rows, _ in engine.graphs.graphs] == [128]  # the prompt's step was a replay
    graphed = generate(fast, prompt, 8, kv_cache_tokens=512, cuda_graphs=True)
    assert graphed[0] == eager[0]
    assert rel_err(graphed[1], eager[1]) < 1e-5


@needs_cuda
def test_graph_inputs_survive_the_allocator_reusing_freed_memory(graph_models):
    # a graph reads raw pointers: an input made for the capture and then freed (the logits rows once were)
    # gets reused, and the replay reads whatever lands there as indices. Fill every small free block with
    # an out-of-range index between the steps.
    fast, _ = graph_models
    prompts = [[5, 9, 200, 7, 1], list(range(30, 42)), [100, 101, 102]]
    eager = generate(fast, prompts, 12)[0]
    engine = Engine(fast, EngineConfig(kv_cache_tokens=256, prefix_cache=False))
    ids = [engine.add_request(p, max_tokens=12) for p in prompts]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished:
        junk = [torch.full((n,), 1 << 40, dtype=torch.int64, device="cuda") for n in (1, 64, 512) for _ in range(256)]
        del junk
        for out in engine.step():
            if out.token is not None:
                tokens[out.request_id].append(out.token)
    assert engine.graphs.graphs
    assert [tokens[i] for i in ids] == eager


@needs_cuda
def test_overlapped_graph_steps_give_the_synchronous_tokens(graph_models):
    """Replayed steps launched before the one before them is booked (on by default on CUDA), fed its
    sampled tokens on the device, with a stop token that ends a request whose next row is launched."""
    fast, _ = graph_models
    prompts = [[5, 9, 200, 7, 1], list(range(30, 42)), [100, 101, 102]]

    def run(overlap: bool, stops: dict[int, list[int]]) -> tuple[list[list[int]], Engine]:
        engine = Engine(fast, EngineConfig(kv_cache_tokens=256, prefix_cache=False, overlap=overlap))
        ids = [engine.add_request(p, max_tokens=10 + 4 * i, stop=stops.get(i, [])) for i, p in enumerate(prompts)]
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished:
            for out in engine.step():
                if out.token is not None:
                    tokens[out.request_id].append(out.token)
        return [tokens[i] for i in ids], engine

    plain, _ = run(False, {})
    stops = {1: [plain[1][3]]}
    expected, _ = run(False, stops)
    got, engine = run(True, stops)
    assert got == expected and len(got[1]) < len(plain[1])
    assert engine.graphs.graphs and engine.stats.overlapped > 0 and engine.blocks.num_used == 0


@needs_cuda
def test_the_fast_path_gives_the_reference_tokens_for_200_tokens(graph_models):
    fast, ref = graph_models
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]  # past the 8-token window of the sliding layer, and 12 blocks
    graphed = generate(fast, prompt, 200, kv_cache_tokens=512, cuda_graphs=True)[0]
    assert graphed == generate(ref, prompt, 200, kv_cache_tokens=512)[0]


@needs_cuda
def test_a_graphed_batch_of_16_equals_each_sequence_alone(graph_models):
    fast, _ = graph_models
    prompts = [[(7 * i + j) % 500 for j in range(3 + i)] for i in range(16)]
    together = generate(fast, prompts, 10, kv_cache_tokens=1024, cuda_graphs=True)[0]
    assert together == [generate(fast, [p], 10, cuda_graphs=True)[0][0] for p in prompts]


@needs_cuda
def test_a_graph_replay_never_syncs_with_the_host(graph_models):
    fast, _ = graph_models
    engine = Engine(fast, EngineConfig(kv_cache_tokens=256, cuda_graphs=True))
    for i in range(3):
        engine.add_request([1 + i, 2, 3], max_tokens=8)
    engine.step()  # the prefill
    engine.step()  # the first decode step captures the graph
    assert engine.graphs.graphs
    from ossq.engine.engine import _Planned

    plan = [_Planned(req, req.num_computed, req.num_computed + n) for req, n in engine.scheduler.schedule()]
    chunks = engine._chunks(plan)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            engine.graphs.run(chunks)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("drafter", ["ngram", "self"])
def test_verification_steps_replay_as_graphs_and_keep_the_greedy_tokens(graph_models, drafter):
    from ossq.engine.speculative import SpeculativeConfig, speculative_engine

    fast, _ = graph_models
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6] * 3, list(range(30, 42))]  # repetition for the n-gram drafter
    plain = generate(fast, prompts, 40, kv_cache_tokens=1024, cuda_graphs=True)[0]
    config = EngineConfig(kv_cache_tokens=1024, prefix_cache=False)
    draft = "ngram" if drafter == "ngram" else fast
    engine = speculative_engine(fast, config, SpeculativeConfig(draft, 4, adaptive=False))
    ids = [engine.add_request(p, max_tokens=40) for p in prompts]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished:
        for out in engine.step():
            if out.token is not None:
                tokens[out.request_id].append(out.token)
    assert [tokens[i] for i in ids] == plain
    assert engine.speculator.stats.verify_steps > 0
    assert any(rows > len(prompts) for rows, _ in engine.graphs.graphs)  # verification rows were graphed
