"""Calibrated quantization (issue 12) against its oracles: GPTQ against the layer-wise objective computed
directly and against `mx.quantize` (RTN) for an identity Hessian; the calibration forward against the
engine; AWQ folding against the unfolded model; `--target-bpw` against its own size rule; mlx-lm loading
the calibrated output; and the errors bad flags get."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ossq.calibrate import Forward, Tokens
from ossq.convert import convert
from ossq.engine.engine import forward_full
from ossq.engine.ops import TorchOps
from ossq.errors import OssqError, UnsupportedQuantization
from ossq.formats.hf import Checkpoint
from ossq.formats.mlx import linear_modules
from ossq.quant import affine, allocate, awq, gptq
from ossq.quant.recipe import Plan
from ossq.quant.spec import QuantSpec
from tests.conftest import random_model, small_config, tensors, to_mx


def correlated(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """(n, c) inputs whose channels are strongly correlated and unequal in scale, as activations are."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=gen) * 0.3 + torch.eye(c)
    scale = torch.rand(c, generator=gen) * 4 + 0.1
    return (torch.randn(n, c, generator=gen) @ mix) * scale


def dense(wq, scales, biases, bits, group) -> torch.Tensor:
    return affine.dequantize(wq, scales, biases, bits=bits, group_size=group, dtype=torch.float32)


# ---- GPTQ ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "group"), [(2, 128), (3, 64), (4, 32), (8, 64)])
def test_gptq_with_an_identity_hessian_equals_mx_quantize_bit_for_bit(bits, group):
    mx = pytest.importorskip("mlx.core")
    w = torch.randn(3, 24, 256, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)  # an expert stack
    wq, scales, biases = gptq.quantize(w, torch.eye(256) * 7.0, bits=bits, group_size=group)
    ref_q, ref_s, ref_b = mx.quantize(to_mx(w), group_size=group, bits=bits, mode="affine")
    assert np.array_equal(wq.view(torch.int32).numpy().view(np.uint32), np.array(ref_q))
    for ours, theirs in ((scales, ref_s), (biases, ref_b)):
        assert np.array_equal(ours.view(torch.int16).numpy().view(np.uint16), np.array(theirs.view(mx.uint16)))


@pytest.mark.parametrize(("bits", "group"), [(3, 64), (4, 32), (4, 128)])
def test_gptq_reduces_the_layer_output_error_against_rtn_on_correlated_inputs(bits, group):
    x = correlated(4096, 256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def objective(w_hat: torch.Tensor) -> float:  # ||W X − Ŵ X||², computed directly
        return float(((w.float() - w_hat) @ x.T).pow(2).sum())

    rtn = objective(dense(*affine.quantize(w, bits=bits, group_size=group), bits, group))
    ours = objective(dense(*gptq.quantize(w, x.T @ x, bits=bits, group_size=group), bits, group))
    assert ours < 0.8 * rtn


def test_gptq_leaves_an_expert_that_saw_no_tokens_at_round_to_nearest():
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x = correlated(512, 64)
    hessians = torch.stack([x.T @ x, torch.zeros(64, 64)])
    wq, scales, biases = gptq.quantize(w, hessians, bits=4, group_size=32)
    rq, rs, rb = affine.quantize(w[1], bits=4, group_size=32)
    assert torch.equal(wq[1], rq) and torch.equal(scales[1], rs) and torch.equal(biases[1], rb)
    assert not torch.equal(wq[0], affine.quantize(w[0], bits=4, group_size=32)[0])


# ---- the calibration forward --------------------------------------------------------------------------
def buffer_reader(model):
    buffers = dict(model.named_buffers())
    return lambda name, expert: buffers[name] if expert is None else buffers[name][expert]


def walk(model, ids: torch.Tensor) -> Forward:
    """A Forward over the rows of `ids` (B, T) as B sequences, run to the end."""
    tokens = Tokens.of(ids.flatten().tolist(), torch.device("cpu"), seq_tokens=ids.shape[1])
    forward = Forward(buffer_reader(model), model.config, tokens)
    for _ in forward.layers():
        pass
    return forward


IDS = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))  # longer than the window 8


def test_calibration_forward_computes_the_engines_logits():
    model = random_model(small_config())
    logits = walk(model, IDS).final() @ model.lm_head.weight.T
    expected = forward_full(model, IDS).reshape(logits.shape)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# ---- AWQ ----------------------------------------------------------------------------------------------
def fold_model(model, scales: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Fold per-layer (attention, MLP) scales into a GptOss's buffers, as the converter folds them."""
    with torch.no_grad():
        for i, (s_attn, s_mlp) in scales.items():
            block = model.model.layers[i]
            attn = [getattr(block.self_attn, m).weight for m in ("q_proj", "k_proj", "v_proj")]
            mlp = [block.mlp.router.weight, block.mlp.experts.gate_proj.weight, block.mlp.experts.up_proj.weight]
            for norm, weights, s in (
                (block.input_layernorm, attn, s_attn),
                (block.post_attention_layernorm, mlp, s_mlp),
            ):
                new_norm, new = awq.fold(norm.weight, weights, s)
                norm.weight.copy_(new_norm)
                for w, n in zip(weights, new, strict=True):
                    w.copy_(n)


def test_awq_folded_model_computes_the_same_logits_and_routing_before_quantization():
    model = random_model(small_config())
    before = forward_full(model, IDS)
    gen = torch.Generator().manual_seed(4)
    C = model.config.hidden_size
    scales = {i: (torch.rand(C, generator=gen) * 3 + 0.3, torch.rand(C, generator=gen) * 3 + 0.3) for i in range(4)}
    block = model.model.layers[0]
    h = torch.randn(16, C, generator=gen)
    ops = TorchOps()
    router_before = F.linear(ops.rms_norm(h, block.post_attention_layernorm.weight, 1e-5), block.mlp.router.weight)
    fold_model(model, scales)
    router_after = F.linear(ops.rms_norm(h, block.post_attention_layernorm.weight, 1e-5), block.mlp.router.weight)
    torch.testing.assert_close(router_after, router_before, rtol=1e-5, atol=1e-5)  # the router stays consistent
    torch.testing.assert_close(forward_full(model, IDS), before, rtol=1e-4, atol=1e-4)


def test_awq_search_never_predicts_more_error_than_rtn():
    x = correlated(2048, 128)
    h = x.T @ x
    w = torch.randn(3, 32, 128, generator=torch.Generator().manual_seed(5))
    spec = QuantSpec(3, 64)
    rms = awq.channel_rms(h, 2048)
    s = awq.search([w[0], w], [h, h], [spec, spec], rms=rms)
    searched = awq.output_error(w[0], h, spec, s) + awq.output_error(w, h, spec, s)
    plain = awq.output_error(w[0], h, spec, torch.ones(128)) + awq.output_error(w, h, spec, torch.ones(128))
    assert searched < plain  # skewed channel scales: AWQ finds a better α than 0


# ---- --target-bpw ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [3.6, 4.25])
def test_target_bpw_plan_hits_its_bits_per_weight_within_two_hundredths(target):
    config = small_config()
    model = random_model(config)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(6))
    tokens = Tokens.of(ids.flatten().tolist(), torch.device("cpu"), seq_tokens=64)
    options = allocate.sensitivities(Forward(buffer_reader(model), config, tokens), config, allocate.Space())
    specs = allocate.allocate(options, allocate.module_budget(config, target))
    bpw = Plan(allocate.recipe(specs, target), config, specs).bits_per_weight
    assert target - 0.02 <= bpw <= target
    assert len({s for s in specs.values()}) > 1  # a mixed plan, not one uniform setting


def test_max_bits_caps_every_tensor_and_rules_out_bf16():
    config = small_config()
    model = random_model(config)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(7))
    tokens = Tokens.of(ids.flatten().tolist(), torch.device("cpu"), seq_tokens=64)
    options = allocate.sensitivities(Forward(buffer_reader(model), config, tokens), config, allocate.Space(4))
    specs = allocate.allocate(options, allocate.module_budget(config, 4.25))
    assert all(s is not None and s.bits <= 4 for s in specs.values())
    assert Plan(allocate.recipe(specs, 4.25), config, specs).bits_per_weight <= 4.25
    with pytest.raises(UnsupportedQuantization, match="outside what this model can be stored in"):
        allocate.check_target(config, 6.0, allocate.Space(4))  # 4-bit g32 everywhere is 5 bits per weight
    with pytest.raises(UnsupportedQuantization, match="--max-bits must be one of"):
        allocate.check_target(config, 4.0, allocate.Space(7))


def test_gptq_sensitivities_price_what_gptq_delivers(monkeypatch):
    """lm_head's loss is GPTQ's own objective, so GPTQ-rounded candidates score lower than RTN ones; the
    embedding has no input Hessian and keeps RTN's; above GPTQ_FLOPS one GPTQ/RTN ratio scales RTN."""
    config = small_config()
    model = random_model(config)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(8))
    tokens = Tokens.of(ids.flatten().tolist(), torch.device("cpu"), seq_tokens=64)

    def measure(calibrated: bool) -> dict[str, list[allocate.Option]]:
        forward = Forward(buffer_reader(model), config, tokens)
        return allocate.sensitivities(forward, config, allocate.Space(4), calibrated=calibrated)

    rtn, cal = measure(False), measure(True)
    assert all(a.spec == b.spec and b.loss < a.loss for a, b in zip(rtn["lm_head"], cal["lm_head"], strict=True))
    assert cal["model.embed_tokens"] == rtn["model.embed_tokens"]
    monkeypatch.setattr(allocate, "GPTQ_FLOPS", 0)
    scaled = measure(True)
    exact = next(o.loss for o in cal["lm_head"] if o.spec == allocate.RATIO_SPEC)
    ratio = exact / next(o.loss for o in rtn["lm_head"] if o.spec == allocate.RATIO_SPEC)
    assert ratio < 1
    for a, b in zip(rtn["lm_head"], scaled["lm_head"], strict=True):
        assert b.loss == pytest.approx(a.loss * ratio, rel=1e-5)


def test_sensitivities_are_priced_in_kl_at_the_output():
    """A module's predicted loss is in KL at the logits, with the engine's own forward as the oracle:
    lm_head's at RATIO_SPEC is the KL that rounding lm_head alone causes, and a layer's modules (and the
    embedding) at RATIO_SPEC add up to about the KL of rounding them together (first order)."""
    config = small_config()
    model = random_model(config)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(9))
    tokens = Tokens.of(ids.flatten().tolist(), torch.device("cpu"), seq_tokens=64)
    options = allocate.sensitivities(Forward(buffer_reader(model), config, tokens), config, allocate.Space())
    ref = torch.log_softmax(forward_full(model, ids).reshape(-1, config.vocab_size), -1)

    def kl_rounding(paths: list[str]) -> float:
        rounded = copy.deepcopy(model)
        buffers = dict(rounded.named_buffers())
        with torch.no_grad():
            for path in paths:
                w = buffers[f"{path}.weight"]
                w.copy_(awq.fake_quantize(w, allocate.RATIO_SPEC))
        logq = torch.log_softmax(forward_full(rounded, ids).reshape(-1, config.vocab_size), -1)
        return float((ref.exp() * (ref - logq)).sum(-1).mean())

    def predicted(path: str) -> float:
        return next(o.loss for o in options[path] if o.spec == allocate.RATIO_SPEC)

    assert predicted("lm_head") == pytest.approx(kl_rounding(["lm_head"]), rel=1e-3)
    for site in (["model.embed_tokens"], [m.path for m in linear_modules(config) if m.layer == 1]):
        assert 0.5 < sum(map(predicted, site)) / kl_rounding(site) < 2


def test_allocation_prefers_the_sensitive_module_at_equal_cost():
    a = [allocate.Option(QuantSpec(2, 64), 100, 1.0), allocate.Option(QuantSpec(4, 64), 200, 0.1)]
    b = [allocate.Option(QuantSpec(2, 64), 100, 0.2), allocate.Option(QuantSpec(4, 64), 200, 0.1)]
    specs = allocate.allocate({"a": a, "b": b}, 300)
    assert specs == {"a": QuantSpec(4, 64), "b": QuantSpec(2, 64)}


def test_allocation_spends_what_a_too_large_hull_step_leaves_on_an_option_off_the_hull():
    # 3-bit lies above the 2→4-bit chord, so the greedy never stops there; 4-bit does not fit 250 bytes
    a = [allocate.Option(QuantSpec(2, 64), 100, 1.0), allocate.Option(QuantSpec(3, 64), 220, 0.6)]
    a.append(allocate.Option(QuantSpec(4, 64), 300, 0.0))
    assert [o.spec.bits for o in allocate.hull(a)] == [2, 4]
    assert allocate.allocate({"a": a}, 250) == {"a": QuantSpec(3, 64)}


# ---- the converter --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gptq", "awq", "target-bpw", "target-bpw-keep"])
def test_mlx_lm_loads_calibrated_output_and_it_runs_like_our_engine(
    method, tiny_checkpoint, calib_text, keep_vocab_recipe, tmp_path
):
    """target-bpw: the allocator's mixed bits and groups, rounded with GPTQ, in mlx-lm's per-module
    quantization config; -keep: beside the source's MXFP4 experts, copied bit for bit."""
    mx = pytest.importorskip("mlx.core")
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from ossq.engine.load import load_model

    out = tmp_path / method
    if method.startswith("target-bpw"):
        how = dict(target_bpw=4.5, max_bits=6, calibrate="gptq")
    else:
        how = dict(quant_predicate=str(keep_vocab_recipe), calibrate=method)
    experts = "keep" if method.endswith("-keep") else "quantize"
    report = convert(
        tiny_checkpoint, out, quantize=True, experts=experts, calib_data=str(calib_text), calib_tokens=256,
        progress=False, **how,
    )  # fmt: skip
    if method.startswith("target-bpw"):
        assert report.bits_per_weight <= 4.5
    if experts == "keep":
        convert(tiny_checkpoint, tmp_path / "stored", progress=False)
        got, stored = tensors(out), tensors(tmp_path / "stored")
        expert_tensors = [n for n in stored if ".mlp.experts." in n and not n.endswith("_bias")]
        assert expert_tensors and all(torch.equal(got[n], stored[n]) for n in expert_tensors)
    model, _ = mlx_lm_utils.load_model(out)
    model.set_dtype(mx.float32)  # bf16 activations flip the argmax of this tiny random model's near-ties
    tokens = [200, 1000, 5000, 70000, 3, 42, 9000, 12]
    theirs = np.array(model(mx.array(tokens)[None]).astype(mx.float32))[0]
    ours_model, _ = load_model(out, device="cpu", dtype=torch.float32)
    ours = forward_full(ours_model, torch.tensor([tokens]))[0].numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 0.05
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.75


def test_target_bpw_dry_run_prints_the_allocated_plan_and_writes_nothing(tiny_checkpoint, calib_text, tmp_path):
    from rich.console import Console

    buf = io.StringIO()
    report = convert(
        tiny_checkpoint, tmp_path / "out", quantize=True, experts="quantize", target_bpw=4.25,
        calib_data=str(calib_text), calib_tokens=128, dry_run=True, console=Console(file=buf, width=200),
    )  # fmt: skip
    text = buf.getvalue()
    assert "allocated to 4.25 bits per weight" in text and "total" in text
    assert report.bits_per_weight <= 4.25 and not (tmp_path / "out").exists()


def test_target_bpw_at_the_sources_size_chooses_the_source_itself(tiny_checkpoint, calib_text, tmp_path):
    """Stored MXFP4 experts and bf16 elsewhere lose nothing, so at the source's own bits per weight the
    allocator, free to quantize the experts, keeps them and everything else as they are."""
    as_stored = convert(tiny_checkpoint, tmp_path / "stored", progress=False)
    report = convert(
        tiny_checkpoint, tmp_path / "out", quantize=True, experts="quantize",
        target_bpw=as_stored.bits_per_weight + 0.01, calib_data=str(calib_text), calib_tokens=128, progress=False,
    )  # fmt: skip
    assert report.bits_per_weight == pytest.approx(as_stored.bits_per_weight)
    got, stored = tensors(tmp_path / "out"), tensors(tmp_path / "stored")
    assert got.keys() == stored.keys() and all(torch.equal(got[n], stored[n]) for n in stored)


def test_kept_experts_bound_the_target_and_the_error_says_how_to_free_them(tiny_checkpoint, calib_text, tmp_path):
    config = Checkpoint(tiny_checkpoint).config
    stored = {m.path: QuantSpec(4, 32, "mxfp4") for m in linear_modules(config) if m.experts}
    free, kept = allocate.Space(None, stored), allocate.Space(None, stored, frozenset(stored))
    assert allocate.bounds(config, kept)[0] > allocate.bounds(config, free)[0]
    assert all(kept.candidates(m) == [QuantSpec(4, 32, "mxfp4")] for m in linear_modules(config) if m.experts)
    with pytest.raises(UnsupportedQuantization, match="pass --experts quantize"):
        convert(
            tiny_checkpoint, tmp_path / "out", quantize=True, target_bpw=allocate.bounds(config, free)[0],
            calib_data=str(calib_text), progress=False,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"calibrate": "gptq"}, OssqError, "needs --calib-data"),
        ({"target_bpw": 3.6}, OssqError, "needs --calib-data"),
        ({"calibrate": "gptq", "q_mode": "mxfp4", "calib_data": "x.txt"}, UnsupportedQuantization, "--q-mode mxfp4"),
        ({"calibrate": "hqq", "calib_data": "x.txt"}, OssqError, "must be one of gptq, awq"),
        ({"target_bpw": 3.6, "q_bits": 4, "calib_data": "x.txt"}, UnsupportedQuantization, "drop --q-bits"),
        ({"target_bpw": 1.5, "experts": "quantize", "calib_data": "x.txt"}, UnsupportedQuantization, "outside"),
    ],
)
def test_bad_calibration_flags_get_clear_errors(kwargs, error, message, tiny_checkpoint, tmp_path):
    with pytest.raises(error, match=message):
        convert(tiny_checkpoint, tmp_path / "out", quantize=True, progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_calibrate_needs_quantize(tiny_checkpoint, tmp_path):
    with pytest.raises(UnsupportedQuantization, match="needs -q"):
        convert(tiny_checkpoint, tmp_path / "out", calibrate="gptq", calib_data="x.txt", progress=False)
