"""The MLX (mlx-lm) layout of gpt-oss: module paths, parameter names and shapes, the `quantization`
config with its per-path overrides, and how a checkpoint is written (parameter order, 5 GiB shards,
index, config.json, a streaming safetensors writer).

These names are also ossq's runtime parameter names, so loading any checkpoint is a strict one-to-one
match against `expected_tensors`. Rules mirror mlx-lm `models/gpt_oss.py` and `utils.py`
(shared spec formats.md §2.2, §3.3–§3.6).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ossq.config import ModelConfig
from ossq.errors import CheckpointError, OssqError
from ossq.quant.spec import QuantSpec


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable module: a Linear, the Embedding, or a per-expert SwitchLinear."""

    path: str
    kind: str  # embed_tokens, q_proj, k_proj, v_proj, o_proj, router, gate_proj, up_proj, down_proj, lm_head
    out_features: int
    in_features: int
    experts: int | None = None
    bias: bool = True
    layer: int | None = None

    @property
    def lead(self) -> tuple[int, ...]:
        return (self.experts, self.out_features) if self.experts else (self.out_features,)

    @property
    def numel(self) -> int:
        return (self.experts or 1) * self.out_features * self.in_features


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def linear_modules(config: ModelConfig) -> list[LinearInfo]:
    """Every quantizable module in mlx-lm's in-memory (and so file-write) order, formats.md §2.2."""
    c = config
    H, D, E, I = c.hidden_size, c.head_dim, c.num_local_experts, c.intermediate_size
    mods = [LinearInfo("model.embed_tokens", "embed_tokens", c.vocab_size, H, bias=False)]
    for i in range(c.num_hidden_layers):
        a, m = f"{layer_prefix(i)}.self_attn", f"{layer_prefix(i)}.mlp"
        mods += [
            LinearInfo(f"{a}.q_proj", "q_proj", c.num_attention_heads * D, H, layer=i),
            LinearInfo(f"{a}.k_proj", "k_proj", c.num_key_value_heads * D, H, layer=i),
            LinearInfo(f"{a}.v_proj", "v_proj", c.num_key_value_heads * D, H, layer=i),
            LinearInfo(f"{a}.o_proj", "o_proj", H, c.num_attention_heads * D, layer=i),
            LinearInfo(f"{m}.experts.gate_proj", "gate_proj", I, H, experts=E, layer=i),
            LinearInfo(f"{m}.experts.up_proj", "up_proj", I, H, experts=E, layer=i),
            LinearInfo(f"{m}.experts.down_proj", "down_proj", H, I, experts=E, layer=i),
            LinearInfo(f"{m}.router", "router", E, H, layer=i),
        ]
    mods.append(LinearInfo("lm_head", "lm_head", c.vocab_size, H, bias=False))
    return mods


def plain_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameters that are never quantized: norms and attention sinks."""
    out = {"model.norm.weight": (config.hidden_size,)}
    for i in range(config.num_hidden_layers):
        p = layer_prefix(i)
        out[f"{p}.self_attn.sinks"] = (config.num_attention_heads,)
        out[f"{p}.input_layernorm.weight"] = (config.hidden_size,)
        out[f"{p}.post_attention_layernorm.weight"] = (config.hidden_size,)
    return out


def module_tensors(mod: LinearInfo, spec: QuantSpec | None) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes one module stores under `spec` (None: unquantized)."""
    if spec is None:
        shapes = {"weight": (*mod.lead, mod.in_features)}
    else:
        shapes = spec.stored_shapes(mod.lead, mod.in_features)
    if mod.bias:
        shapes["bias"] = mod.lead
    return {f"{mod.path}.{k}": v for k, v in shapes.items()}


def expected_tensors(config: ModelConfig, specs: dict[str, QuantSpec | None]) -> dict[str, tuple[int, ...]]:
    """The complete name → shape map of a checkpoint whose modules are stored as `specs` says."""
    out = dict(plain_tensors(config))
    for mod in linear_modules(config):
        out.update(module_tensors(mod, specs.get(mod.path)))
    return out


def specs_from_config(
    quantization: dict[str, Any] | None, config: ModelConfig, keys: set[str]
) -> dict[str, QuantSpec | None]:
    """Decide each module's storage as mlx-lm's loader does (formats.md §3.6): a per-path entry wins
    (`false` = unquantized); otherwise the module is quantized with the top-level parameters iff the
    checkpoint holds `<path>.scales`."""
    if not quantization:
        stray = sorted(k for k in keys if k.endswith(".scales"))
        if stray:
            raise CheckpointError(f"config.json has no 'quantization' but the weights hold {stray[0]}")
        return {m.path: None for m in linear_modules(config)}
    top = QuantSpec.from_config(quantization)
    specs: dict[str, QuantSpec | None] = {}
    for mod in linear_modules(config):
        entry = quantization.get(mod.path)
        if entry is False:
            specs[mod.path] = None
        elif isinstance(entry, dict):
            specs[mod.path] = QuantSpec.from_config(entry, top)
        else:
            specs[mod.path] = top if f"{mod.path}.scales" in keys else None
    return specs


# ---- writing: parameter order, shards, index, config.json ------------------------------------------------
MAX_SHARD_BYTES = 5 << 30  # mlx-lm utils.MAX_FILE_SIZE_GB = 5, applied as `<< 30`
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.uint8: "U8",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_order(config: ModelConfig) -> list[LinearInfo | str]:
    """Modules and plain tensor names in mlx-lm's parameter order (`tree_flatten(model.parameters())` of
    `models/gpt_oss.py`): embed_tokens, norm, then per layer sinks, q/k/v/o, the experts' gate/up/down,
    router and the two layer norms, then lm_head. mlx-lm's shard split follows this order."""
    mods = iter(linear_modules(config))
    order: list[LinearInfo | str] = [next(mods), "model.norm.weight"]
    for i in range(config.num_hidden_layers):
        p = layer_prefix(i)
        order += [f"{p}.self_attn.sinks", *(next(mods) for _ in range(8))]
        order += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    order.append(next(mods))
    return order


def parameter_order(config: ModelConfig, specs: dict[str, QuantSpec | None]) -> list[str]:
    """Every tensor name in mlx-lm's order; inside a module `weight, scales, biases, bias`."""
    names: list[str] = []
    for item in write_order(config):
        names += [item] if isinstance(item, str) else list(module_tensors(item, specs.get(item.path)))
    return names


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of an output file, known before its data exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_plan(entries: list[TensorEntry], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[TensorEntry]]:
    """mlx-lm's `make_shards`: tensors in order; a new shard starts when the next tensor would push the
    current one past the limit, so a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorEntry]] = []
    size = 0
    for entry in entries:
        if not shards or size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """`model.safetensors` for one shard, else `model-00001-of-0000N.safetensors` (1-based), as mlx-lm's
    `save_model` names them."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(entries: list[TensorEntry]) -> bytes:
    """The 8-byte little-endian length and the JSON header of a file holding `entries` in order, with
    mlx-lm's `{"format": "mlx"}` metadata, space-padded so the data start on an 8-byte boundary."""
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": SAFETENSORS_DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


@dataclass
class _Slot:
    fd: int
    start: int  # absolute file offset of the tensor's first byte
    entry: TensorEntry
    written: int = 0


class ShardWriter:
    """Writes the weight shards of one checkpoint into an (empty) directory without holding more than the
    tensor (or slice) being appended: every header is written first, since names, dtypes, shapes and
    offsets are fixed by `entries`; then each tensor's bytes arrive through `append`, whole or as
    consecutive slices along its first axis (one expert at a time), in any interleaving across tensors.
    `close` checks that every tensor was written exactly to its end."""

    def __init__(self, directory: Path, entries: list[TensorEntry], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.shards = shard_plan(entries, max_shard_bytes)
        self.files = shard_names(len(self.shards))
        self._fds: list[int] = []
        self._slots: dict[str, _Slot] = {}
        for name, shard in zip(self.files, self.shards, strict=True):
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds.append(fd)
            header = safetensors_header(shard)
            _pwrite_all(fd, memoryview(header), 0)
            offset = len(header)
            for e in shard:
                self._slots[e.name] = _Slot(fd, offset, e)
                offset += e.nbytes

    def append(self, name: str, t: torch.Tensor) -> None:
        """Write `t` — the whole tensor `name`, or its next slice along the first axis — after the bytes
        already written for it. Dtype and shape must match the entry."""
        slot = self._slots[name]
        e = slot.entry
        if t.dtype != e.dtype or tuple(t.shape) not in (e.shape, e.shape[1:]):
            raise AssertionError(f"{name}: got {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
        data = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        if slot.written + data.nbytes > e.nbytes:
            raise AssertionError(f"{name}: more data than its planned {e.nbytes} bytes")
        _pwrite_all(slot.fd, data, slot.start + slot.written)
        slot.written += data.nbytes

    def close(self) -> None:
        """Close every file; raise if any tensor was left incomplete."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        short = [s.entry.name for s in self._slots.values() if s.written != s.entry.nbytes]
        if short:
            raise AssertionError(f"{len(short)} tensors were not fully written, e.g. {short[0]}")

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def index(self, total_parameters: int) -> dict[str, Any]:
        """`model.safetensors.index.json` as mlx-lm writes it: total tensor bytes, mlx-lm's parameter count
        (formats.md §3.4), and the weight map sorted by name."""
        weight_map = {e.name: f for f, shard in zip(self.files, self.shards, strict=True) for e in shard}
        return {
            "metadata": {
                "total_size": sum(s.entry.nbytes for s in self._slots.values()),
                "total_parameters": total_parameters,
            },
            "weight_map": dict(sorted(weight_map.items())),
        }


def overwrite_tensors(spans: dict[str, tuple[Path, int, int]], tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Write each tensor's bytes over its data in its shard (`--distill`): `spans` maps a name to (file,
    start, end) byte offsets, as formats.hf reads them. Names, dtypes, shapes and offsets are unchanged,
    so every header and the layout stay as written."""
    fds: dict[Path, int] = {}
    try:
        for name, t in tensors:
            path, start, end = spans[name]
            data = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
            assert data.nbytes == end - start, (name, data.nbytes, end - start)
            if path not in fds:
                fds[path] = os.open(path, os.O_WRONLY)
            _pwrite_all(fds[path], data, start)
    finally:
        for fd in fds.values():
            os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def quantization_entries(
    top: QuantSpec,
    specs: dict[str, QuantSpec | None],
    *,
    explicit: frozenset[str] = frozenset(),
    group_size_null: bool = False,
) -> dict[str, Any]:
    """config.json's `quantization`: the top-level (bits, group_size, mode), then a per-path entry for every
    quantized module in `explicit` and for every other one whose spec differs from the top level, so
    mlx-lm 0.32.0 (top level for unlisted modules) and 0.32.2 (inferred from the tensors) agree
    (formats.md §3.5, §3.6). `group_size_null` writes `"group_size": null` in the explicit entries, as
    mlx-lm does for a mixed recipe run without --q-group-size (§3.7). Modules left unquantized need no
    entry: they have no `.scales`."""
    out: dict[str, Any] = top.to_config()
    for path, spec in specs.items():
        if spec is None or (path not in explicit and spec == top):
            continue
        entry = spec.to_config()
        if group_size_null and path in explicit:
            entry["group_size"] = None
        out[path] = entry
    return out


def config_json(
    raw: dict[str, Any], *, eos_token_id: Any = None, quantization: dict[str, Any] | None
) -> dict[str, Any]:
    """The output config.json as mlx-lm's `load_config` + `save_config` leave it (formats.md §3.5): the
    source config without `_name_or_path`/`vision_config`; `eos_token_id` replaced by the generation
    config's (a list for gpt-oss); `rope_scaling` + `rope_theta` at the top level, converted from
    transformers 5's `rope_parameters` when that is all the source has (mlx-lm reads only the former);
    `quantization` and an identical `quantization_config` (replacing Hugging Face's `quant_method` entry),
    or neither for an unquantized output. Keys sorted; write with `indent=4`."""
    d = copy.deepcopy(raw)
    for key in ("_name_or_path", "vision_config", "quantization", "quantization_config"):
        d.pop(key, None)
    if eos_token_id:
        d["eos_token_id"] = eos_token_id
    if "rope_scaling" not in d and isinstance(d.get("rope_parameters"), dict):
        rope = dict(d.pop("rope_parameters"))
        theta = rope.pop("rope_theta", None)
        d["rope_scaling"] = rope if rope.get("rope_type", rope.get("type")) not in (None, "default") else None
        if theta is not None:
            d.setdefault("rope_theta", theta)
    if quantization:
        d["quantization"] = quantization
        d["quantization_config"] = copy.deepcopy(quantization)
    return dict(sorted(d.items()))


# ---- atomic publish: a hidden staging directory next to the destination ---------------------------------
def _staging_pattern(dest: Path) -> re.Pattern[str]:
    """`.<name>.<pid>.<8 hex>.tmp` (and `.old`, a replaced destination not yet deleted); older ossq versions
    wrote no pid."""
    return re.compile(rf"\.{re.escape(dest.name)}\.(?:(\d+)\.)?[0-9a-f]{{8}}\.tmp(?:\.old)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_staging(dest: Path) -> list[Path]:
    """Staging directories next to `dest` whose writer is gone (killed, e.g. by SIGKILL or a power cut):
    their pid names no running process. A live writer's directory is never listed."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern = _staging_pattern(dest)
    found = []
    for p in sorted(dest.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and (m.group(1) is None or not _alive(int(m.group(1)))):
            found.append(p)
    return found


def remove_stale_staging(dest: Path) -> list[Path]:
    """Delete `stale_staging(dest)` and return what was deleted."""
    stale = stale_staging(dest)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def check_creatable(dest: Path, flag: str) -> None:
    """That the directory `dest` (named by the CLI's `flag`) can be created: not a file, and its nearest
    existing ancestor a writable directory. OssqError otherwise, before any work."""
    if dest.exists() and not dest.is_dir():
        raise OssqError(f"{dest} is a file; {flag} names the directory to create")
    anchor = dest.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OssqError(f"cannot create {dest}: {anchor} is a file")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OssqError(f"cannot create {dest}: {anchor} is not writable")


@contextlib.contextmanager
def staging(dest: Path, *, replace: bool = False) -> Iterator[Path]:
    """A fresh hidden directory next to `dest`, renamed to `dest` when the block completes and removed
    (with everything in it) when it fails or is interrupted — any exception, KeyboardInterrupt and the
    CLI's signal exits included. With `replace` an existing `dest` is replaced only then. The name
    carries our pid, so a later run can tell a killed writer's leftovers (`stale_staging`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, dest, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, dest: Path, replace: bool) -> None:
    if not dest.exists():
        tmp.rename(dest)
        return
    if not replace:
        raise OssqError(f"{dest} appeared while it was being written; the result was discarded")
    old = tmp.with_name(tmp.name + ".old")
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()
