"""Synthetic gpt-oss checkpoints in the exact published Hugging Face layout.

No weights can be downloaded in CI (and users may want to test a pipeline before a 13 GB download), so
ossq writes its own: config.json and generation_config.json as published, zero-based safetensors shards
with an index, experts as MXFP4 `*_blocks`/`*_scales` + bf16 `*_bias`, everything else bf16, and an
o200k_harmony tokenizer.json. Weights are random but scaled (≈ 1/√fan-in) so activations stay finite and
O(1) through every layer; the expert codes and E8M0 scales are drawn directly, which makes full-size
presets quick to produce. Written to a hidden staging dir and renamed only when complete (formats.mlx.staging).

`random_quantized_model` skips the files: it draws a model's stored codes, scales and biases straight
into a GptOss on the device, as a recipe would store them. That is how gpt-oss-120b is benchmarked on a
machine whose disk cannot hold its 65 GB source: speed depends on the layout, not on the values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ossq.config import ModelConfig, preset
from ossq.device import default_dtype, resolve_device
from ossq.errors import OssqError
from ossq.formats.mlx import INDEX_FILE, check_creatable, layer_prefix, remove_stale_staging, staging
from ossq.quant.recipe import Recipe, plan
from ossq.tokenizer import write_tokenizer_files

if TYPE_CHECKING:
    from ossq.engine.model import GptOss, Linear
    from ossq.engine.ops import Ops

MAX_SHARD_BYTES = 5 * 10**9
E2M1_RMS = math.sqrt(sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8)  # of a uniformly random code


def hf_config_dict(config: ModelConfig) -> dict:
    """config.json as the published checkpoint has it (formats.md §4.4)."""
    d = config.to_dict()
    d["eos_token_id"] = config.eos_token_id[0]
    d["quantization_config"] = {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
    d["transformers_version"] = "4.55.0.dev0"
    return d


def generation_config_dict(config: ModelConfig) -> dict:
    return {
        "bos_token_id": config.bos_token_id,
        "do_sample": True,
        "eos_token_id": list(config.eos_token_id),
        "pad_token_id": config.pad_token_id,
        "transformers_version": "4.55.0.dev0",
    }


class _Draw:
    """Seeded random tensors, drawn on `device` (fast on a GPU) and returned on the CPU."""

    def __init__(self, seed: int, device: str) -> None:
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def normal(self, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, device=self.device) * std + mean
        return t.to(torch.bfloat16).cpu()

    def mxfp4(self, *shape: int, std: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks (…, nb, 16) u8, scales (…, nb) u8) whose decoded values have about `std` RMS."""
        *lead, n = shape
        blocks = torch.randint(0, 256, (*lead, n // 32, 16), generator=self.gen, device=self.device, dtype=torch.uint8)
        center = round(127 + math.log2(std / E2M1_RMS))
        scales = torch.randint(
            center - 1, center + 2, (*lead, n // 32), generator=self.gen, device=self.device, dtype=torch.uint8
        )
        return blocks.cpu(), scales.cpu()


def _tensors(config: ModelConfig, draw: _Draw) -> Iterator[tuple[str, torch.Tensor]]:
    c = config
    C, I, E, D = c.hidden_size, c.intermediate_size, c.num_local_experts, c.head_dim
    yield "model.embed_tokens.weight", draw.normal(c.vocab_size, C, std=1.0)
    for i in range(c.num_hidden_layers):
        p = layer_prefix(i)
        yield f"{p}.input_layernorm.weight", draw.normal(C, std=0.1, mean=1.0)
        yield f"{p}.post_attention_layernorm.weight", draw.normal(C, std=0.1, mean=1.0)
        for name, rows, cols in (
            ("q_proj", c.num_attention_heads * D, C),
            ("k_proj", c.num_key_value_heads * D, C),
            ("v_proj", c.num_key_value_heads * D, C),
            ("o_proj", C, c.num_attention_heads * D),
        ):
            yield f"{p}.self_attn.{name}.weight", draw.normal(rows, cols, std=cols**-0.5)
            yield f"{p}.self_attn.{name}.bias", draw.normal(rows, std=0.05)
        yield f"{p}.self_attn.sinks", draw.normal(c.num_attention_heads, std=1.0)
        yield f"{p}.mlp.router.weight", draw.normal(E, C, std=C**-0.5)
        yield f"{p}.mlp.router.bias", draw.normal(E, std=0.1)
        for name, rows, cols in (("gate_up_proj", 2 * I, C), ("down_proj", C, I)):
            blocks, scales = draw.mxfp4(E, rows, cols, std=cols**-0.5)
            yield f"{p}.mlp.experts.{name}_blocks", blocks
            yield f"{p}.mlp.experts.{name}_scales", scales
            yield f"{p}.mlp.experts.{name}_bias", draw.normal(E, rows, std=0.05)
    yield "model.norm.weight", draw.normal(C, std=0.1, mean=1.0)
    yield "lm_head.weight", draw.normal(c.vocab_size, C, std=C**-0.5)


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int) -> None:
    """Zero-based shard names whose "of" number is count − 1, as the published checkpoints have them.
    Holds at most one shard's tensors in memory."""
    groups: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            _flush(current, groups, out)
            size = 0
        current[name] = t
        size += n
        total += n
    _flush(current, groups, out)
    weight_map = {}
    for i, names in enumerate(groups):
        final = f"model-{i:05d}-of-{len(groups) - 1:05d}.safetensors"
        (out / f"shard-{i}.tmp").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _flush(current: dict[str, torch.Tensor], groups: list[list[str]], out: Path) -> None:
    save_file(current, str(out / f"shard-{len(groups)}.tmp"), metadata={"format": "pt"})
    groups.append(list(current))
    current.clear()


def synthesize(
    out: str | Path,
    *,
    config: ModelConfig | str = "tiny",
    seed: int = 0,
    device: str = "cpu",
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a random gpt-oss checkpoint in the published layout to `out` and return its path. Files are
    world-readable (0644, directory 0755), as a downloaded checkpoint's are."""
    config = preset(config) if isinstance(config, str) else config
    draw = _Draw(seed, str(resolve_device(device)))
    return write_checkpoint(out, config, _tensors(config, draw), max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def write_checkpoint(
    out: str | Path,
    config: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` (published names and layouts, in the order `_tensors` yields them) with the
    published config, generation config, index and tokenizer files to `out`, atomically; → its path.
    benchmarks/train_small.py saves its trained model through this."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise OssqError(f"{out} already exists; choose another path or pass --force to replace it")
    check_creatable(out, "--out")
    remove_stale_staging(out)
    with staging(out, replace=overwrite) as tmp:
        _write_shards(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config_dict(config), indent=2))
        write_tokenizer_files(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes through a private temp file (0600)
        tmp.chmod(0o755)
    return out


@torch.no_grad()
def random_quantized_model(
    config: ModelConfig | str,
    recipe: Recipe,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    ops: Ops | str | None = None,
    seed: int = 0,
) -> GptOss:
    """A GptOss stored as `recipe` says, its codes drawn uniformly and its scales chosen so every weight
    has about 1/√fan-in RMS, built on the device without a checkpoint; `ops.prepare` has run."""
    from ossq.engine.model import GptOss, Linear
    from ossq.engine.ops import select_ops

    config = preset(config) if isinstance(config, str) else config
    dev = resolve_device(device)
    ops = select_ops(ops, dev) if ops is None or isinstance(ops, str) else ops
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.device(dev):
        model = GptOss(config, plan(recipe, config).specs, dtype=dtype or default_dtype(dev), ops=ops)
    for module in model.modules():
        if isinstance(module, Linear):
            _draw_linear(module, gen)
    for name, buf in model.named_buffers():
        if name.endswith("sinks"):
            buf.normal_(generator=gen)
    ops.prepare(model)
    return model.eval()


def _draw_linear(lin: Linear, gen: torch.Generator) -> None:
    spec = lin.spec
    fan_in = lin.scales.shape[-1] * spec.group_size if spec else lin.weight.shape[-1]
    std = fan_in**-0.5
    if lin.bias is not None:
        lin.bias.normal_(std=0.05, generator=gen)
    if spec is None:
        lin.weight.normal_(std=std, generator=gen)
        return
    packed = lin.weight.view(torch.int32)
    packed.copy_(torch.randint(-(2**31), 2**31, packed.shape, generator=gen, device=packed.device, dtype=torch.int32))
    if spec.mode == "mxfp4":
        lin.scales.fill_(round(127 + math.log2(std / E2M1_RMS)))
        return
    half = std * math.sqrt(3)  # uniform codes over [−half, half] have RMS std
    lin.scales.fill_(2 * half / (2**spec.bits - 1))
    lin.biases.fill_(-half)
