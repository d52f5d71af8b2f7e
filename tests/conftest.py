"""Shared fixtures: tiny synthetic checkpoints, made once per test session."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ossq.config import PRESETS, ModelConfig


def pytest_configure(config):
    # Hermetic: the tokenizer/ranks cache goes to a fresh directory, never the user's ~/.cache.
    os.environ.setdefault("OSSQ_CACHE", tempfile.mkdtemp(prefix="ossq-test-cache-"))


def small_config(**overrides) -> ModelConfig:
    """The tiny preset with a small vocabulary, for tests that need no tokenizer."""
    if "num_hidden_layers" in overrides:
        overrides.setdefault("layer_types", ())  # re-derive the alternation for the new depth
    overrides.setdefault("vocab_size", 512)
    if overrides["vocab_size"] <= 199999:
        overrides.update(pad_token_id=None, bos_token_id=None)  # the special ids lie outside a small vocabulary
    return dataclasses.replace(PRESETS["tiny"], **overrides)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny gpt-oss in the published HF layout (MXFP4 experts, 3 zero-based shards, real tokenizer)."""
    from ossq.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("ckpt") / "tiny", config="tiny", seed=0, max_shard_bytes=20_000_000)


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint):
    """tiny_checkpoint loaded in this process: what one request alone generates (the servers' oracle)."""
    import ossq

    return ossq.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """Like tiny_checkpoint but with a 512-token vocabulary: quick to load and to compare."""
    from ossq.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("ckpt") / "small", config=small_config(), seed=1, max_shard_bytes=200_000)


def transformers_dequantized(path: Path):
    """transformers' GptOssForCausalLM in bf16 with its MXFP4 experts dequantized at load.

    Asked for explicitly: with triton and the `kernels` package installed, transformers otherwise swaps
    in hub-downloaded MoE kernels (network, and not the reference math we compare against)."""
    import transformers

    config = transformers.Mxfp4Config(dequantize=True)
    return transformers.GptOssForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config)


def to_mx(t: torch.Tensor):
    """A torch tensor as an mlx array with the same bits (bf16 travels as uint16)."""
    mx = pytest.importorskip("mlx.core")
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy().view(np.uint16)).view(mx.bfloat16)
    if t.dtype == torch.uint32:
        return mx.array(t.view(torch.int32).numpy().view(np.uint32))
    return mx.array(t.numpy())


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by name."""
    out = {}
    for shard in sorted(path.glob("model*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def random_model(config: ModelConfig | None = None, seed: int = 0):
    """An unquantized float32 GptOss with random weights scaled so activations stay O(1): no checkpoint,
    no tokenizer — for engine tests that compare the model with itself."""
    from ossq.engine.model import GptOss

    model = GptOss(config or small_config(), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("inv_freq"):
                continue
            std = 1.0 if "embed" in name or "sinks" in name else b.shape[-1] ** -0.5
            b.copy_((1.0 if "norm" in name else 0.0) + std * torch.randn(b.shape, generator=gen))
    return model


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory):
    """Calibration text of about 500 tokens."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40 + "Hackers write code at night.\n" * 40)
    return path


@pytest.fixture(scope="session")
def keep_vocab_recipe(tmp_path_factory):
    """A recipe file: 3-bit g32 everywhere but the 201k-row embedding and lm_head, which stay bf16
    (fast to convert, calibrate and distill)."""
    path = tmp_path_factory.mktemp("recipe") / "r.json"
    rule = '{"match": ["embed_tokens", "lm_head"], "keep": true}'
    path.write_text('{"default": {"bits": 3, "group_size": 32}, "rules": [' + rule + "]}")
    return path
