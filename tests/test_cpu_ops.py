"""CpuOps against its oracle TorchOps: every affine bits × group size and MXFP4, linear layers with and
without bias, the embedding, expert stacks through the MoE at one, odd and grouped token counts — equal
within fp32 rounding in float32, within 1.5× of the reference's error in bfloat16 — and the memory bound
obeyed; then the same greedy tokens from a converted checkpoint through the engine."""

from __future__ import annotations

import copy

import pytest
import torch

from ossq.convert import convert
from ossq.engine.cpu_ops import CpuOps, Int4Planes, form_bytes
from ossq.engine.engine import Engine, EngineConfig
from ossq.engine.load import load_model
from ossq.engine.model import GptOss, Linear
from ossq.engine.ops import GATHER_MAX_PAIRS, TorchOps, select_ops
from ossq.formats.mlx import linear_modules
from ossq.quant import affine, mxfp4
from ossq.quant.spec import QuantSpec
from tests.conftest import small_config

RTOL = ATOL = 1e-5
# Room for o_proj and down_proj rows to hold a group of 128; 4 experts, 2 per token.
CONFIG = small_config(hidden_size=128, intermediate_size=128, head_dim=32, num_hidden_layers=2, vocab_size=272)
SPECS = [QuantSpec(bits=b, group_size=g) for b in affine.BITS for g in affine.GROUP_SIZES]
SPECS.append(QuantSpec(bits=4, group_size=32, mode="mxfp4"))
ROWS = (1, 5)  # one token, an odd count
MOE_ROWS = (1, 5, GATHER_MAX_PAIRS)  # the reference gathers per pair below GATHER_MAX_PAIRS pairs, groups above


def spec_id(spec: QuantSpec) -> str:
    return f"{spec.mode}{spec.bits}g{spec.group_size}"


def quantized_model(spec: QuantSpec, dtype: torch.dtype, *, seed: int = 0) -> GptOss:
    """CONFIG with every linear layer (embedding, lm_head and experts too) stored by `spec`, random weights."""
    specs = {m.path: spec for m in linear_modules(CONFIG)}
    model = GptOss(CONFIG, specs, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Linear):
                fill(m, name, gen)
        for name, b in model.named_buffers():
            if name.endswith(("layernorm.weight", "norm.weight")):
                b.copy_(1 + 0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("sinks"):
                b.copy_(torch.randn(b.shape, generator=gen))
    return model


def fill(lin: Linear, name: str, gen: torch.Generator) -> None:
    *lead, k = lin.weight.shape
    k = k * 32 // lin.spec.bits
    std = 1.0 if "embed" in name else k**-0.5
    w = std * torch.randn(*lead, k, generator=gen)
    if lin.spec.mode == "mxfp4":
        lin.weight.copy_(mxfp4.quantize(w)[0])
        lin.scales.copy_(mxfp4.quantize(w)[1])
    else:
        q, s, b = affine.quantize(w.to(lin.scales.dtype), bits=lin.spec.bits, group_size=lin.spec.group_size)
        lin.weight.copy_(q), lin.scales.copy_(s), lin.biases.copy_(b)
    if lin.bias is not None:
        lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=gen))


def prepared(model: GptOss, **kwargs) -> CpuOps:
    ops = CpuOps(**kwargs)
    ops.prepare(model)
    return ops


def attention_and_head(model: GptOss) -> list[Linear]:
    layer = model.model.layers[0]
    a = layer.self_attn
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.router, model.lm_head]


def inputs(rows: int, width: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


def moe(ops, model: GptOss, x: torch.Tensor) -> torch.Tensor:
    c = model.config
    mlp = model.model.layers[1].mlp
    return ops.moe(x, mlp, top_k=c.num_experts_per_tok, limit=c.swiglu_limit, alpha=c.swiglu_alpha)


# ---- float32: equal to the reference ---------------------------------------------------------------
@pytest.fixture(scope="module", params=SPECS, ids=spec_id)
def fp32_case(request):
    model = quantized_model(request.param, torch.float32)
    return model, prepared(model)


def test_every_quantized_weight_gets_a_form_under_the_default_bound(fp32_case):
    model, ops = fp32_case
    quantized = [m for m in model.modules() if isinstance(m, Linear)]
    assert set(ops.forms) == set(quantized)
    embed = model.model.embed_tokens
    assert ops.cached_bytes == sum(form_bytes(m, torch.float32, gather=m is embed) for m in quantized)
    assert ops.cached_bytes == sum(f.nbytes for f in ops.forms.values())


@pytest.mark.parametrize("rows", ROWS)
def test_linear_equals_the_reference_in_float32(fp32_case, rows):
    model, ops = fp32_case
    for lin in attention_and_head(model):  # q/k/v/o and the router have a bias, lm_head has none
        x = inputs(rows, lin.weight.shape[-1] * 32 // lin.spec.bits, torch.float32)
        torch.testing.assert_close(ops.linear(x, lin), TorchOps().linear(x, lin), rtol=RTOL, atol=ATOL)


def test_embedding_equals_the_reference_in_float32(fp32_case):
    model, ops = fp32_case
    ids = torch.tensor([[0, 271, 5], [17, 17, 3]])
    emb = model.model.embed_tokens
    torch.testing.assert_close(
        ops.embedding(ids, emb, torch.float32), TorchOps().embedding(ids, emb, torch.float32), rtol=0, atol=0
    )


@pytest.mark.parametrize("rows", MOE_ROWS)
def test_moe_equals_the_reference_in_float32(fp32_case, rows):
    model, ops = fp32_case
    x = inputs(rows, CONFIG.hidden_size, torch.float32)
    torch.testing.assert_close(moe(ops, model, x), moe(TorchOps(), model, x), rtol=RTOL, atol=ATOL)


# ---- bfloat16: packed planes, as accurate as the reference -------------------------------------------
def bf16_errors(ours: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    def err(t: torch.Tensor) -> float:
        return ((t.float() - exact).norm() / exact.norm()).item()

    return err(ours), err(reference)


def in_float32(model: GptOss) -> GptOss:
    """The same stored weights with every float tensor in float32: the reference computed without bfloat16."""
    exact = copy.deepcopy(model).float()
    exact.dtype = torch.float32
    return exact


@pytest.mark.parametrize("spec", SPECS[:-1:2] + SPECS[-1:], ids=spec_id)
def test_bfloat16_error_stays_within_one_and_a_half_times_the_references(spec):
    """Against float32 on the same stored weights, CpuOps in bfloat16 (packed planes where the rows allow,
    one rounding per plane) errs by at most 1.5× what TorchOps in bfloat16 does."""
    model = quantized_model(spec, torch.bfloat16)
    ops, ref, exact = prepared(model), TorchOps(), in_float32(model)
    assert isinstance(ops.forms[model.lm_head], Int4Planes)
    assert isinstance(ops.forms[model.model.layers[0].mlp.experts.down_proj], Int4Planes)
    assert isinstance(ops.forms[model.model.embed_tokens], torch.Tensor)  # gathered from, never packed
    assert ops.cached_bytes == sum(f.nbytes for f in ops.forms.values())
    named = dict(model.named_modules())
    exact_of = {m: exact.get_submodule(n) for n, m in named.items() if isinstance(m, Linear)}
    for rows in ROWS:
        for lin in attention_and_head(model):
            width = lin.weight.shape[-1] * 32 // lin.spec.bits
            x = inputs(width, rows, torch.bfloat16).T  # strided activations: the kernel needs them contiguous
            want = ref.linear(x.float(), exact_of[lin])
            ours, theirs = bf16_errors(ops.linear(x, lin), ref.linear(x, lin), want)
            assert ours <= 1.5 * theirs + 1e-3, (lin.weight.shape, rows)
    x = inputs(5, CONFIG.hidden_size, torch.bfloat16)
    ours, theirs = bf16_errors(moe(ops, model, x), moe(ref, model, x), moe(ref, exact, x.float()))
    assert ours <= 1.5 * theirs + 1e-3


def test_packed_planes_built_in_blocks_of_rows_equal_those_built_at_once(monkeypatch):
    model = quantized_model(QuantSpec(bits=6, group_size=32), torch.bfloat16)
    whole = prepared(model).forms[model.lm_head]
    monkeypatch.setattr(affine, "CHUNK_ELEMENTS", 64 * CONFIG.hidden_size)  # 64 rows a block: 272 = 4·64 + 16
    blocks = prepared(model).forms[model.lm_head]
    for a, b in zip(whole.packed + whole.scale_zeros, blocks.packed + blocks.scale_zeros, strict=True):
        assert torch.equal(a, b)


# ---- the memory bound ------------------------------------------------------------------------------
def test_a_tiny_bound_caches_nothing_and_changes_nothing():
    model = quantized_model(QuantSpec(bits=4, group_size=64), torch.float32)
    ops = prepared(model, max_cache_bytes=1)
    assert ops.forms == {} and ops.cached_bytes == 0
    x, ids = inputs(3, CONFIG.hidden_size, torch.float32), torch.tensor([4, 9])
    ref = TorchOps()
    for lin in attention_and_head(model):
        torch.testing.assert_close(ops.linear(x, lin), ref.linear(x, lin), rtol=RTOL, atol=ATOL)
    emb = model.model.embed_tokens
    torch.testing.assert_close(ops.embedding(ids, emb, torch.float32), ref.embedding(ids, emb, torch.float32))
    torch.testing.assert_close(moe(ops, model, x), moe(ref, model, x), rtol=RTOL, atol=ATOL)


def test_a_partial_bound_is_respected_and_fills_linear_layers_before_experts_and_the_embedding():
    model = quantized_model(QuantSpec(bits=8, group_size=32), torch.float32)
    full = prepared(model).cached_bytes
    experts = [m for m in model.modules() if isinstance(m, Linear) and m.weight.dim() == 3]
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.weight.dim() == 2]
    linears.remove(model.model.embed_tokens)
    bound = sum(form_bytes(m, torch.float32) for m in linears) + form_bytes(experts[0], torch.float32)
    ops = prepared(model, max_cache_bytes=bound)
    assert ops.cached_bytes <= bound < full
    assert set(linears) <= set(ops.forms) and model.model.embed_tokens not in ops.forms
    assert sum(m in ops.forms for m in experts) == 1
    x = inputs(5, CONFIG.hidden_size, torch.float32)
    torch.testing.assert_close(moe(ops, model, x), moe(TorchOps(), model, x), rtol=RTOL, atol=ATOL)


# ---- end to end --------------------------------------------------------------------------------------
def greedy(model: GptOss, prompt: list[int], n: int) -> list[int]:
    engine = Engine(model, EngineConfig(kv_cache_tokens=256))
    rid = engine.add_request(prompt, max_tokens=n)
    tokens = []
    while engine.has_unfinished:
        tokens += [o.token for o in engine.step() if o.request_id == rid and o.token is not None]
    return tokens


@pytest.mark.parametrize(
    "recipe",
    [{"q_bits": 4, "experts": "quantize"}, {"q_bits": 8, "experts": "quantize"}, {"q_bits": 4}],
    ids=["q4", "q8", "q4-mxfp4-experts"],
)
def test_a_converted_checkpoint_decodes_the_same_greedy_tokens_with_cpu_and_torch_ops(
    small_checkpoint, tmp_path, recipe
):
    dst = tmp_path / "q"
    convert(small_checkpoint, dst, quantize=True, progress=False, **recipe)
    prompt = torch.randint(0, 512, (23,), generator=torch.Generator().manual_seed(recipe["q_bits"])).tolist()
    tokens = {}
    for name in ("torch", "cpu"):
        model, _ = load_model(dst, device="cpu", dtype=torch.float32, ops=name)
        assert model.ops.name == name
        tokens[name] = greedy(model, prompt, 24)
    assert tokens["cpu"] == tokens["torch"] and len(tokens["cpu"]) == 24


def test_the_cpu_defaults_to_cpu_ops():
    assert isinstance(select_ops(None, torch.device("cpu")), CpuOps)
