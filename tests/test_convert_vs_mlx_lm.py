"""ossq's converter against mlx-lm's: same flags, same source → the same tensors, bit for bit, and a config
that mlx-lm's loader resolves the same way; then mlx-lm loads our output for every recipe, generates, and
its logits agree with our engine's.

Sources: the published MXFP4 layout (`small_checkpoint`) and a bf16 source. mlx-lm cannot read
transformers' bf16 layout (offline.md §2), so the bf16 source both tools read is the MLX-layout bf16
checkpoint that `mlx_lm convert -d` makes from the MXFP4 one; a separate test shows our `dequantize=True`
writes exactly that checkpoint, and another that our conversion of transformers' layout equals mlx-lm's of
its MLX twin. The sources get a 512-token word-level tokenizer so that mlx-lm's tokenizer round trip costs
milliseconds instead of seconds; the weights are `small_checkpoint`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ossq.config import ModelConfig, preset
from ossq.convert import convert
from ossq.engine.engine import forward_full
from ossq.engine.load import load_model
from ossq.engine.model import yarn_inv_freq
from ossq.formats.hf import Checkpoint
from ossq.formats.mlx import TensorEntry, expected_tensors, parameter_order, shard_plan
from ossq.quant.recipe import plan, uniform
from ossq.quant.spec import QuantSpec
from tests.conftest import tensors, transformers_dequantized

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from mlx_lm.utils import compute_bits_per_weight, make_shards  # noqa: E402
from mlx_lm.utils import load_model as mlx_load_model  # noqa: E402

# name: (mlx_lm convert flags, ossq convert keywords)
FLAGS = {
    "q4": (["-q"], {"quantize": True}),
    "q8g32": (["-q", "--q-bits", "8", "--q-group-size", "32"], {"quantize": True, "q_bits": 8, "q_group_size": 32}),
    "mixed_3_6": (["-q", "--quant-predicate", "mixed_3_6"], {"quantize": True, "quant_predicate": "mixed_3_6"}),
    "q4-f32": (["-q", "--dtype", "float32"], {"quantize": True, "dtype": "float32"}),
}
CASES = ["bf16", *(f"{source}-{flags}" for source in ("mxfp4", "bf16") for flags in FLAGS)]
RECIPES = {
    "q4": {},
    "q8g32": {"q_bits": 8, "q_group_size": 32},
    **{name: {"quant_predicate": name} for name in ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")},
    "tiered": {"quant_predicate": "tiered"},
    "mxfp4-experts": {"quant_predicate": "mxfp4-experts"},
    "experts-quantize": {"experts": "quantize"},
    "mode-mxfp4": {"q_mode": "mxfp4", "experts": "quantize"},
}
# Our engine and mlx-lm, both in float32 on the same checkpoint, agree to ~7e-7 (relative L2 of the
# logits); one flipped low bit in a packed weight moves them by ≥ 1e-4 (test below), so 1e-5 tells them apart.
REL_TOL = 1e-5
MLX_LM_CONVERT = """
import json, sys
from mlx_lm.convert import main
for argv in json.loads(sys.argv[1]):
    sys.argv = ["mlx_lm.convert", *argv]
    main()
"""


def write_word_tokenizer(path: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="module")
def work(tmp_path_factory, small_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("vs_mlx_lm")
    shutil.copytree(small_checkpoint, root / "mxfp4")
    write_word_tokenizer(root / "mxfp4")
    return root


@pytest.fixture(scope="module")
def theirs(work) -> Path:
    """mlx-lm's conversions, each through its own command-line entry point (`mlx_lm.convert.main`), all
    in one subprocess so the imports are paid once. `bf16` (made with -d) must come before its users."""
    out = work / "theirs"
    jobs = [["--hf-path", str(work / "mxfp4"), "--mlx-path", str(out / "bf16"), "-d"]]
    for source in ("mxfp4", "bf16"):
        src = work / "mxfp4" if source == "mxfp4" else out / "bf16"
        jobs += [
            ["--hf-path", str(src), "--mlx-path", str(out / f"{source}-{name}"), *flags]
            for name, (flags, _) in FLAGS.items()
        ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MLX_LM_CONVERT, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ours(work, theirs) -> Path:
    """Ours from the same sources: the MXFP4 one, and mlx-lm's bf16 MLX checkpoint made from it."""
    out = work / "ours"
    convert(work / "mxfp4", out / "bf16", dequantize=True, progress=False)
    for source in ("mxfp4", "bf16"):
        src = work / "mxfp4" if source == "mxfp4" else theirs / "bf16"
        for name, (_, kwargs) in FLAGS.items():
            convert(src, out / f"{source}-{name}", progress=False, **kwargs)
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensors(a_path: Path, b_path: Path) -> None:
    a, b = tensors(a_path), tensors(b_path)
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert raw_bytes(a[name]) == raw_bytes(b[name]), name


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def effective_storage(path: Path) -> dict[str, tuple]:
    """Each leaf module's class and (bits, group_size, mode) after mlx-lm's loader has read the config."""
    model, _ = mlx_load_model(path, lazy=True)
    return {
        name: (type(m).__name__, getattr(m, "bits", None), getattr(m, "group_size", None), getattr(m, "mode", None))
        for name, m in tree_flatten(model.leaf_modules(), is_leaf=nn_module)
    }


def nn_module(x) -> bool:
    import mlx.nn as nn

    return isinstance(x, nn.Module)


@pytest.mark.parametrize("case", CASES)
def test_tensors_and_index_are_identical_to_mlx_lm(case, ours, theirs):
    assert_same_tensors(ours / case, theirs / case)
    assert sorted(p.name for p in (ours / case).glob("model*.safetensors")) == sorted(
        p.name for p in (theirs / case).glob("model*.safetensors")
    )
    assert read_json(ours / case / "model.safetensors.index.json") == read_json(
        theirs / case / "model.safetensors.index.json"
    )


@pytest.mark.parametrize("case", CASES)
def test_config_resolves_like_mlx_lm(case, ours, theirs):
    a, b = read_json(ours / case / "config.json"), read_json(theirs / case / "config.json")
    quant_keys = ("quantization", "quantization_config")
    assert {k: v for k, v in a.items() if k not in quant_keys} == {k: v for k, v in b.items() if k not in quant_keys}
    assert a["eos_token_id"] == [200002, 199999, 200012]  # the generation config's list, as mlx-lm copies it
    assert "rope_scaling" in a and "rope_theta" in a and list(a) == sorted(a)
    assert (ours / case / "config.json").read_text().startswith('{\n    "')  # indent 4
    if "quantization" not in b:
        assert not set(quant_keys) & set(a)
        return
    qa, qb = a["quantization"], b["quantization"]
    assert a["quantization_config"] == qa
    assert sorted(qa) == sorted(qb)  # the same per-path entries, and the same top level ...
    for key, entry in qb.items():  # ... with the same values; a missing "mode" means affine
        if isinstance(entry, dict):
            assert {**qa[key], "mode": qa[key].get("mode", "affine")} == {**entry, "mode": entry.get("mode", "affine")}
        else:
            assert qa[key] == entry, key
    assert effective_storage(ours / case) == effective_storage(theirs / case)


def test_parameter_order_is_mlx_lm_model_order(theirs):
    path = theirs / "mxfp4-mixed_3_6"
    model, _ = mlx_load_model(path, lazy=True)
    ckpt = Checkpoint(path)
    assert parameter_order(ckpt.config, ckpt.specs) == [k for k, _ in tree_flatten(model.parameters())]


def test_shards_split_like_mlx_lm_at_full_size():
    """gpt-oss-120b at 4 bits spans many 5 GiB shards: our split equals mlx-lm's `make_shards`."""
    config = preset("120b")
    specs = plan(uniform(4, 64), config).specs
    shapes = expected_tensors(config, specs)
    entries = [TensorEntry(name, stored_dtype(name, specs), shapes[name]) for name in parameter_order(config, specs)]

    class Sized:
        def __init__(self, nbytes: int) -> None:
            self.nbytes = nbytes

    expected = make_shards({e.name: Sized(e.nbytes) for e in entries})
    got = shard_plan(entries)
    assert len(got) > 3
    assert [[e.name for e in shard] for shard in got] == [list(shard) for shard in expected]


def stored_dtype(name: str, specs: dict[str, QuantSpec | None]) -> torch.dtype:
    module, part = name.rsplit(".", 1)
    spec = specs.get(module)
    if spec is not None and part == "weight":
        return torch.uint32
    if spec is not None and part == "scales" and spec.mode == "mxfp4":
        return torch.uint8
    return torch.bfloat16


def test_transformers_layout_converts_to_mlx_lm_bytes_of_its_mlx_twin(work, theirs, tmp_path):
    """transformers' save_pretrained layout (bf16, experts (E, in, out), rope_parameters) → the same tensors
    mlx-lm makes from the MLX-layout bf16 checkpoint holding the same values, and a config with YaRN at
    the top level where mlx-lm reads it."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers_dequantized(work / "mxfp4")
    model.save_pretrained(tmp_path / "tf")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(work / "mxfp4" / name, tmp_path / "tf" / name)
    assert "rope_parameters" in read_json(tmp_path / "tf" / "config.json")
    convert(tmp_path / "tf", tmp_path / "out", quantize=True, progress=False)
    assert_same_tensors(tmp_path / "out", theirs / "bf16-q4")
    config, source = read_json(tmp_path / "out" / "config.json"), read_json(work / "mxfp4" / "config.json")
    assert (config["rope_scaling"], config["rope_theta"]) == (source["rope_scaling"], source["rope_theta"])
    assert "rope_parameters" not in config


# ---- mlx-lm runs our output -------------------------------------------------------------------------------
def mlx_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """mlx-lm's logits in float32, with its YaRN replaced by the exact (transformers) frequencies: mlx-lm
    floors/ceils the correction band (formats.md §7.1), which would otherwise dominate the difference."""
    model, config = mlx_load_model(path)
    model.update(
        tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters())
    )
    freqs = mx.array((1.0 / yarn_inv_freq(ModelConfig.from_file(path / "config.json")).double()).float().numpy())
    for layer in model.model.layers:
        layer.self_attn.rope._freqs = freqs
    return np.array(model(mx.array(tokens)[None]))[0]


def engine_logits(path: Path, tokens: list[int]) -> np.ndarray:
    model, _ = load_model(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        return forward_full(model, torch.tensor([tokens]))[0].numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


PROMPT = torch.randint(0, 512, (80,), generator=torch.Generator().manual_seed(0)).tolist()  # past window, YaRN ctx


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_mlx_lm_loads_and_runs_our_output_like_our_engine(recipe, work, tmp_path):
    out = tmp_path / recipe
    report = convert(work / "mxfp4", out, quantize=True, progress=False, **RECIPES[recipe])
    model, tokenizer = mlx_lm.load(str(out))
    generated = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt=PROMPT[:12], max_tokens=4)]
    assert len(generated) == 4 and all(0 <= t < 512 for t in generated)
    assert compute_bits_per_weight(model) == pytest.approx(report.bits_per_weight, rel=1e-12)
    expected, got = mlx_logits(out, PROMPT), engine_logits(out, PROMPT)
    assert rel_err(got, expected) < REL_TOL
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_one_flipped_bit_in_a_packed_weight_exceeds_the_logit_tolerance(work, tmp_path):
    out = tmp_path / "q4"
    convert(work / "mxfp4", out, quantize=True, experts="quantize", progress=False)
    expected = mlx_logits(out, PROMPT)
    assert rel_err(engine_logits(out, PROMPT), expected) < REL_TOL
    shard = out / "model.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        header_len = int.from_bytes(shard.read_bytes()[:8], "little")
        name = "model.layers.3.mlp.experts.down_proj.weight"  # an expert of the last layer: a weak spot
        start = 8 + header_len + json.loads(shard.read_bytes()[8 : 8 + header_len])[name]["data_offsets"][0]
        assert f.get_slice(name).get_dtype() == "U32"
    data = bytearray(shard.read_bytes())
    data[start] ^= 1  # the lowest bit of the first 4-bit code of expert 0's first row
    shard.write_bytes(bytes(data))
    assert rel_err(engine_logits(out, PROMPT), expected) > REL_TOL
