"""Reading checkpoints: every layout loads to the same weights; bad input fails by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ossq.engine.load import load_model
from ossq.engine.ops import dequantize
from ossq.errors import CheckpointError, ConfigError
from ossq.formats.hf import Checkpoint, SafetensorsFiles, resolve
from tests.conftest import transformers_dequantized


@pytest.fixture
def copy(small_checkpoint, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(small_checkpoint, dst)
    return dst


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


def rewrite(shard: Path, edit) -> None:
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)


def weights(model) -> dict[str, torch.Tensor]:
    """Every linear weight as float32 (experts decoded), plus all other buffers."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "spec"):
            out[f"{name}.weight"] = dequantize(mod)
            if mod.bias is not None:
                out[f"{name}.bias"] = mod.bias.float()
    for name, b in model.named_buffers():
        if name.endswith(("sinks", "norm.weight", "layernorm.weight")):
            out[name] = b.float()
    return out


def test_published_layout_has_zero_based_shards_and_mxfp4_experts(small_checkpoint):
    names = [p.name for p in shards(small_checkpoint)]
    assert len(names) >= 2 and names[0] == f"model-00000-of-{len(names) - 1:05d}.safetensors"
    ckpt = Checkpoint(small_checkpoint)
    assert ckpt.layout == "hf-mxfp4"
    keys = set(ckpt.files.tensors)
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in keys
    assert ckpt.files.tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == "U8"


def test_transformers_bf16_layout_loads_to_identical_weights(small_checkpoint, tmp_path):
    pytest.importorskip("transformers")
    ref = transformers_dequantized(small_checkpoint)
    ref.save_pretrained(tmp_path / "bf16")
    assert Checkpoint(tmp_path / "bf16").layout == "hf-bf16"
    a, _ = load_model(small_checkpoint, device="cpu", dtype=torch.float32)
    b, _ = load_model(tmp_path / "bf16", device="cpu", dtype=torch.float32)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_mlx_layout_written_by_mlx_lm_loads_to_identical_weights(small_checkpoint, tmp_path):
    pytest.importorskip("mlx_lm")
    out = tmp_path / "mlx"
    subprocess.run(
        [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(small_checkpoint), "--mlx-path", str(out)],
        check=True,
        capture_output=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert Checkpoint(out).layout == "mlx"
    a, _ = load_model(small_checkpoint, device="cpu", dtype=torch.float32)
    b, _ = load_model(out, device="cpu", dtype=torch.float32)
    assert b.model.layers[0].mlp.experts.gate_proj.spec.mode == "mxfp4"
    wa, wb = weights(a), weights(b)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_missing_shard_is_named(copy):
    shards(copy)[1].unlink()
    with pytest.raises(CheckpointError, match="missing shard model-00001"):
        Checkpoint(copy)


def test_truncated_shard_is_named(copy):
    shard = shards(copy)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        load_model(copy, device="cpu")


def test_wrong_tensor_shape_is_named(copy):
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = next(s for s in shards(copy) if name in load_file(s))
    rewrite(shard, lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(CheckpointError, match=rf"{name} has shape"):
        load_model(copy, device="cpu")


def test_missing_tensor_is_named(copy):
    name = "model.layers.2.self_attn.sinks"
    shard = next(s for s in shards(copy) if name in load_file(s))
    rewrite(shard, lambda t: t.pop(name))
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is missing"):
        Checkpoint(copy)


def test_extra_tensor_is_named(copy):
    rewrite(shards(copy)[0], lambda t: t.update({"model.layers.0.mlp.shared_expert.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.mlp.shared_expert.weight"):
        Checkpoint(copy)


def test_unknown_architecture_is_named(copy):
    config = json.loads((copy / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        Checkpoint(copy)


def test_inconsistent_config_field_is_named(copy):
    config = json.loads((copy / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        Checkpoint(copy)


def test_hub_id_offline_says_the_directory_does_not_exist_and_why_the_hub_was_not_asked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointError,
        match="directory openai/gpt-oss-20b-does-not-exist-here does not exist "
        r"\(HF_HUB_OFFLINE is set",
    ):
        resolve("openai/gpt-oss-20b-does-not-exist-here")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"directory {tmp_path}/nope/deeper does not exist$"):
        resolve(tmp_path / "nope" / "deeper")


@pytest.mark.parametrize("layout", ["hf-mxfp4", "hf-bf16"])
def test_loading_reads_each_gate_up_tensor_once(small_checkpoint, tmp_path, monkeypatch, layout):
    path = small_checkpoint
    if layout == "hf-bf16":
        pytest.importorskip("transformers")
        ref = transformers_dequantized(small_checkpoint)
        ref.save_pretrained(tmp_path / "bf16")
        path = tmp_path / "bf16"
    reads: list[str] = []
    real = SafetensorsFiles.read
    monkeypatch.setattr(SafetensorsFiles, "read", lambda self, key, *a: (reads.append(key), real(self, key, *a))[1])
    load_model(path, device="cpu", dtype=torch.float32)
    gate_up = [k for k in reads if ".gate_up_proj" in k]
    assert gate_up and len(gate_up) == len(set(gate_up))
