"""The converter on its own: what it writes, what it refuses, what it leaves behind when it fails, and its
memory bound. (Byte-for-byte agreement with mlx-lm is in test_convert_vs_mlx_lm.py.)"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ossq.convert import convert
from ossq.engine.engine import Engine, EngineConfig, forward_full
from ossq.engine.kv import BLOCK_TOKENS
from ossq.engine.load import load_model
from ossq.engine.ops import dequantize
from ossq.errors import CheckpointError, OssqError, UnsupportedQuantization
from ossq.formats.mlx import ShardWriter, TensorEntry, config_json
from ossq.synth import synthesize
from tests.conftest import small_config, tensors

QUIET = {"progress": False}


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        return forward_full(model, tokens)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


TOKENS = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def q8(small_checkpoint, tmp_path_factory) -> Path:
    """8-bit group-32 conversion of the published layout, experts kept as MXFP4."""
    out = tmp_path_factory.mktemp("convert") / "q8"
    convert(small_checkpoint, out, quantize=True, q_bits=8, q_group_size=32, **QUIET)
    return out


@pytest.fixture(scope="module")
def affine8(small_checkpoint, tmp_path_factory) -> Path:
    """The all-affine flavour: experts decoded and quantized too, 8-bit group 32."""
    out = tmp_path_factory.mktemp("convert") / "affine8"
    convert(small_checkpoint, out, quantize=True, q_bits=8, q_group_size=32, experts="quantize", **QUIET)
    return out


# ---- what it writes ---------------------------------------------------------------------------------------
def test_8bit_output_runs_like_the_source_and_keeps_mxfp4_experts_byte_identical(q8, small_checkpoint):
    source, ours = tensors(small_checkpoint), tensors(q8)
    for layer in range(4):
        p = f"model.layers.{layer}.mlp.experts"  # the same prefix in both layouts
        gate_up, gate_up_scales = source[f"{p}.gate_up_proj_blocks"], source[f"{p}.gate_up_proj_scales"]
        for name, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):  # HF interleave
            assert ours[f"{p}.{name}.weight"].dtype == torch.uint32
            assert (
                ours[f"{p}.{name}.weight"].view(torch.uint8).flatten().tolist() == gate_up[:, rows].flatten().tolist()
            )
            assert torch.equal(ours[f"{p}.{name}.scales"], gate_up_scales[:, rows])
        assert (
            ours[f"{p}.down_proj.weight"].view(torch.uint8).flatten().tolist()
            == source[f"{p}.down_proj_blocks"].flatten().tolist()
        )
    source_model, _ = load_model(small_checkpoint, device="cpu", dtype=torch.float32)
    q8_model, _ = load_model(q8, device="cpu", dtype=torch.float32)
    prompt = TOKENS[0, :16].tolist()
    assert greedy(q8_model, prompt, 12) == greedy(source_model, prompt, 12)
    with torch.no_grad():
        expected, got = forward_full(source_model, TOKENS)[0], forward_full(q8_model, TOKENS)[0]
    # 8-bit group-32 noise on attention, embeddings, lm_head and router: ~2 % per position, more where it
    # flips a routing decision
    assert ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).median() < 0.05


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens through the engine, prefilling 8 tokens a step."""
    engine = Engine(model, EngineConfig(kv_cache_tokens=len(prompt) + n + BLOCK_TOKENS, max_batch_tokens=8))
    rid = engine.add_request(prompt, max_tokens=n)
    return [o.token for o in engine.stream(rid) if o.token is not None]


def test_metadata_files_are_copied_and_config_replaces_the_hf_quantization(small_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_checkpoint, src)
    (src / "chat_template.jinja").write_text("{{ messages }}")
    report = convert(src, tmp_path / "out", quantize=True, **QUIET)
    out = tmp_path / "out"
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert "quant_method" not in config["quantization_config"]
    assert config["eos_token_id"] == json.loads((src / "generation_config.json").read_text())["eos_token_id"]
    assert [p.name for p in out.glob("model*.safetensors")] == ["model.safetensors"]
    assert report.shards == 1 and report.output_bytes == sum(p.stat().st_size for p in out.iterdir())


def test_config_json_moves_transformers_rope_parameters_to_the_top_level():
    rope = {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    }
    raw = {
        "model_type": "gpt_oss",
        "rope_parameters": {**rope, "rope_theta": 150000.0},
        "eos_token_id": 200002,
        "quantization_config": {"quant_method": "mxfp4"},
        "_name_or_path": "x",
    }
    out = config_json(raw, eos_token_id=[200002, 199999], quantization=None)
    assert out == {
        "eos_token_id": [200002, 199999],
        "model_type": "gpt_oss",
        "rope_scaling": rope,
        "rope_theta": 150000.0,
    }


def test_dtype_casts_floating_tensors_and_leaves_packed_ones(q8, small_checkpoint, tmp_path):
    convert(small_checkpoint, tmp_path / "f32", quantize=True, q_bits=8, q_group_size=32, dtype="float32", **QUIET)
    got, ref = tensors(tmp_path / "f32"), tensors(q8)
    assert got.keys() == ref.keys()
    for name, t in got.items():
        assert t.dtype == (torch.float32 if ref[name].is_floating_point() else ref[name].dtype), name
    # bf16 → float32 is exact, so the codes are those of the bf16 conversion
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], ref["model.layers.0.self_attn.q_proj.weight"])


def test_config_torch_dtype_is_the_default_cast_as_in_mlx_lm(small_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_checkpoint, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    convert(src, tmp_path / "out", **QUIET)
    got = tensors(tmp_path / "out")
    assert got["model.norm.weight"].dtype == torch.float32
    assert got["model.layers.0.mlp.experts.down_proj.weight"].dtype == torch.uint32  # MXFP4 kept as stored


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quantize": True},
        {"quantize": True, "quant_predicate": "mixed_3_6", "experts": "quantize"},
        {"quantize": True, "quant_predicate": "tiered", "experts": "quantize"},
    ],
    ids=["q4", "mixed_3_6", "tiered"],
)
def test_dry_run_writes_nothing_and_predicts_the_written_bits_per_weight(kwargs, small_checkpoint, tmp_path):
    out = tmp_path / "out"
    console = quiet_console()
    dry = convert(small_checkpoint, out, dry_run=True, console=console, **kwargs, **QUIET)
    assert not out.exists() and leftovers(tmp_path) == []
    assert "bits per weight" in console.file.getvalue()
    real = convert(small_checkpoint, out, **kwargs, **QUIET)
    stored = sum(t.numel() * t.element_size() for t in tensors(out).values())
    model, _ = load_model(out, device="cpu", dtype=torch.float32)
    # mlx-lm's definitions (formats.md §3.4): every weight unpacked, biases and norms; not the sinks. The
    # bytes add mlx-lm's in-memory rope frequencies (float32, head_dim/2 per layer).
    params = sum(
        dequantize(m).numel() + (m.bias.numel() if m.bias is not None else 0)
        for m in model.modules()
        if hasattr(m, "spec")
    )
    params += sum(b.numel() for name, b in model.named_buffers() if name.endswith("norm.weight"))
    c = model.config
    rope = c.num_hidden_layers * c.head_dim // 2 * 4
    assert (dry.total_parameters, dry.output_bytes) == (params, stored)
    assert dry.bits_per_weight == pytest.approx((stored + rope) * 8 / params, rel=1e-12)
    assert real.bits_per_weight == dry.bits_per_weight and real.shards == dry.shards == 1


def test_group_128_skips_modules_it_does_not_divide_with_a_warning_and_stays_loadable(tmp_path):
    # 8 heads × 16 = 128 inputs to o_proj: the one module group 128 divides (the others are 64 wide)
    config = small_config(num_attention_heads=8, num_key_value_heads=2)
    src = synthesize(tmp_path / "src", config=config, seed=3)
    console = quiet_console()
    report = convert(src, tmp_path / "out", quantize=True, q_group_size=128, console=console, **QUIET)
    assert "warning" in console.file.getvalue() and "does not divide" in console.file.getvalue()
    assert report.skipped and not any("o_proj" in path for path in report.skipped)
    assert all(".experts." not in path for path in report.skipped)  # MXFP4 experts are kept, not skipped
    quantization = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert quantization["model.layers.0.self_attn.o_proj"]["group_size"] == 128
    got, source = tensors(tmp_path / "out"), tensors(src)
    assert "model.layers.0.self_attn.q_proj.scales" not in got  # skipped: copied as stored
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], source["model.layers.0.self_attn.q_proj.weight"])
    model, _ = load_model(tmp_path / "out", device="cpu", dtype=torch.float32)
    o_proj = model.model.layers[0].self_attn.o_proj
    step = o_proj.scales.float().abs().repeat_interleave(128, -1)
    assert ((dequantize(o_proj) - source["model.layers.0.self_attn.o_proj.weight"].float()).abs() <= step).all()
    with torch.no_grad():
        assert forward_full(model, TOKENS).isfinite().all()


def test_dequantize_and_requantize_round_trip(affine8, tmp_path):
    # -d writes each weight as its dequantized value rounded once to bf16, and no quantization keys.
    convert(affine8, tmp_path / "bf16", dequantize=True, **QUIET)
    quantized, _ = load_model(affine8, device="cpu", dtype=torch.float32)
    plain = tensors(tmp_path / "bf16")
    for name, module in quantized.named_modules():
        if hasattr(module, "spec"):
            assert torch.equal(plain[f"{name}.weight"], dequantize(module).to(torch.bfloat16)), name
    assert "quantization" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    # Quantizing that again at the same settings lands within two quantization steps of the original …
    convert(tmp_path / "bf16", tmp_path / "again", quantize=True, q_bits=8, q_group_size=32, **QUIET)
    again, _ = load_model(tmp_path / "again", device="cpu", dtype=torch.float32)
    modules = dict(again.named_modules())
    for name, module in quantized.named_modules():
        if hasattr(module, "spec"):
            steps = module.scales.float().abs().repeat_interleave(module.spec.group_size, -1)
            assert ((dequantize(modules[name]) - dequantize(module)).abs() <= 2 * steps).all(), name
    # … and converting an MLX checkpoint with the settings it already has copies it bit for bit.
    convert(affine8, tmp_path / "same", quantize=True, q_bits=8, q_group_size=32, experts="quantize", **QUIET)
    a, b = tensors(affine8), tensors(tmp_path / "same")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_requantizing_an_mlx_checkpoint_warns_and_equals_dequantizing_then_quantizing(affine8, tmp_path):
    console = quiet_console()
    convert(affine8, tmp_path / "q4", quantize=True, experts="quantize", console=console, **QUIET)
    assert "re-quantizing" in console.file.getvalue()
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    convert(affine8, tmp_path / "bf16", dequantize=True, **QUIET)
    convert(tmp_path / "bf16", tmp_path / "two-steps", quantize=True, **QUIET)
    a, b, source = tensors(tmp_path / "q4"), tensors(tmp_path / "two-steps"), tensors(affine8)
    assert a.keys() == b.keys()
    differ = {k.rsplit(".", 1)[0] for k in a if not torch.equal(a[k], b[k])}
    # only the routers differ: 8-bit group 64 in the source already, so copied rather than re-quantized
    assert differ == {f"model.layers.{i}.mlp.router" for i in range(4)}
    assert all(torch.equal(a[k], source[k]) for k in a if ".router." in k)


# ---- what it refuses, and what a failure leaves ----------------------------------------------------------
def test_existing_destination_is_refused_unless_force(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OssqError, match="already exists"):
        convert(small_checkpoint, out, quantize=True, **QUIET)
    assert leftovers(out) == ["keep.txt"] and leftovers(tmp_path) == ["out"]
    convert(small_checkpoint, out, quantize=True, force=True, **QUIET)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == ["out"]
    with pytest.raises(OssqError, match="must not be the source"):
        convert(out, out, force=True, **QUIET)


def test_truncated_source_shard_fails_before_any_output(small_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_checkpoint, src)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        convert(src, tmp_path / "out", quantize=True, **QUIET)
    assert leftovers(tmp_path) == ["src"]


def test_disk_full_midway_leaves_no_output_and_no_temp_dir(small_checkpoint, tmp_path, monkeypatch):
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 40:  # headers and the first few dozen tensors fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space left"):
        convert(small_checkpoint, tmp_path / "out", quantize=True, **QUIET)
    assert leftovers(tmp_path) == []
    # With force, a failed run leaves the previous destination as it was.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous")
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        convert(small_checkpoint, tmp_path / "out", quantize=True, force=True, **QUIET)
    assert leftovers(tmp_path) == ["out"] and leftovers(tmp_path / "out") == ["old.txt"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"quantize": True, "q_bits": 7}, UnsupportedQuantization, "bits"),
        ({"quantize": True, "q_group_size": 48}, UnsupportedQuantization, "group_size"),
        ({"quantize": True, "q_mode": "nvfp4"}, UnsupportedQuantization, "nvfp4"),
        ({"quantize": True, "quant_predicate": "mixed_9_9"}, UnsupportedQuantization, "unknown recipe"),
        ({"quantize": True, "dequantize": True}, OssqError, "not both"),
        ({"q_bits": 4}, UnsupportedQuantization, "only with -q"),
        ({"experts": "quantize"}, UnsupportedQuantization, "needs -q"),
        ({"experts": "sometimes"}, OssqError, "experts must be"),
        ({"dtype": "int8"}, OssqError, "dtype must be"),
    ],
)
def test_bad_options_fail_before_anything_is_written(kwargs, error, message, small_checkpoint, tmp_path):
    with pytest.raises(error, match=message):
        convert(small_checkpoint, tmp_path / "out", **kwargs, **QUIET)
    assert leftovers(tmp_path) == []


# ---- the streaming writer and the memory bound -----------------------------------------------------------
def test_shard_writer_streams_slices_into_shards_that_load_back(tmp_path):
    gen = torch.Generator().manual_seed(0)
    values = {
        "a.weight": torch.randint(0, 2**31, (3, 5, 4), generator=gen, dtype=torch.int64).to(torch.uint32),
        "a.scales": torch.randn(3, 5, 2, generator=gen).bfloat16(),
        "b.weight": torch.randn(7, 6, generator=gen).bfloat16(),
        "c.scales": torch.randint(0, 255, (3, 8), generator=gen).to(torch.uint8),
    }
    entries = [TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in values.items()]
    writer = ShardWriter(tmp_path, entries, max_shard_bytes=150)
    for e in range(3):  # expert slices of two tensors, interleaved, before and after a whole tensor
        writer.append("a.weight", values["a.weight"][e])
        writer.append("a.scales", values["a.scales"][e])
        if e == 0:
            writer.append("b.weight", values["b.weight"])
        writer.append("c.scales", values["c.scales"][e])
    writer.close()
    assert writer.files == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    got = tensors(tmp_path)
    assert got.keys() == values.keys() and all(torch.equal(got[k], values[k]) for k in values)
    assert writer.index(10)["weight_map"] == {
        "a.scales": writer.files[1],
        "a.weight": writer.files[0],
        "b.weight": writer.files[1],
        "c.scales": writer.files[2],
    }
    mx = pytest.importorskip("mlx.core")
    loaded = {}
    for name in writer.files:
        loaded.update(mx.load(str(tmp_path / name)))
    expected = values["b.weight"].view(torch.uint8).numpy().tobytes()
    assert bytes(memoryview(loaded["b.weight"].view(mx.uint16))) == expected


def test_shard_writer_refuses_a_tensor_left_incomplete(tmp_path):
    writer = ShardWriter(tmp_path, [TensorEntry("x", torch.bfloat16, (4, 2))])
    writer.append("x", torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="not fully written"):
        writer.close()


MEMORY_SCRIPT = """
import json, sys
import rich.console, rich.progress  # everything convert imports, before the baseline
from ossq.convert import convert

def status(key):  # VmHWM, not ru_maxrss: after exec, ru_maxrss also counts the parent's forked image
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
convert(sys.argv[1], sys.argv[2], quantize=True, progress=False)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    """24 layers of 16 experts of 512 × 512: 170 MB of MXFP4 experts streamed through one process, whose
    resident set may grow by a fixed 40 MB — the bound for units this small (largest: one 512 × 512
    tensor) plus allocator slack — far less than the model, or than any one layer's experts."""
    config = small_config(hidden_size=512, intermediate_size=512, num_local_experts=16, num_hidden_layers=24)
    src = synthesize(tmp_path / "src", config=config, seed=0, max_shard_bytes=60_000_000)
    source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    growth = rss["peak"] - rss["before"]
    bound = 40 << 20
    assert source_bytes > 4 * bound
    assert growth < bound, f"peak RSS grew by {growth / 2**20:.0f} MiB converting {source_bytes / 2**20:.0f} MiB"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0.9 * source_bytes  # the experts really went through
