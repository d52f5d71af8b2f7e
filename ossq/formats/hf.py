"""Reading gpt-oss checkpoints: the published Hugging Face layout, transformers' bf16 layout, and the MLX
layout, all presented under MLX tensor names (formats/mlx.py), lazily, one tensor or one expert at a time.

Layouts (shared spec formats.md §2.3, §4.2, offline.md §2):
- `hf-mxfp4`: the published checkpoint. Experts as `gate_up_proj_blocks/_scales/_bias` (gate = even rows,
  up = odd rows) and `down_proj_*`; zero-based shard names, read through the index.
- `hf-bf16`: what transformers' `save_pretrained` writes: `experts.gate_up_proj` (E, C, 2I) with the
  interleave on the last axis, `down_proj` (E, I, C), no `.weight` suffix.
- `mlx`: already split (`experts.gate_proj.weight` …), possibly quantized per config["quantization"].
"""

from __future__ import annotations

import difflib
import json
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ossq.config import ModelConfig, read_config_json
from ossq.errors import CheckpointError, ConfigError
from ossq.formats.mlx import INDEX_FILE, expected_tensors, linear_modules, specs_from_config
from ossq.quant import mxfp4
from ossq.quant.spec import QuantSpec

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name
MXFP4_EXPERTS = QuantSpec(bits=4, group_size=32, mode="mxfp4")


def resolve(path_or_repo: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded with huggingface_hub (config, weights and
    tokenizer only: the `original/` and `metal/` copies are skipped). See `local_checkpoint`."""
    local = local_checkpoint(path_or_repo)
    return local if local is not None else _download(str(path_or_repo))


def local_checkpoint(path_or_repo: str | Path) -> Path | None:
    """The directory `path_or_repo` names, or None for a hub id (nothing is downloaded here).

    A name that looks local — it starts with `.`, `/` or `~`, is not shaped like `owner/name`, or its
    first component is a directory here (`conv/q5` when `conv/` exists) — is never sent to the hub: the
    CheckpointError says the directory does not exist (suggesting a near name). The hub is mentioned only
    when it was asked."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    text = str(path_or_repo)
    if _looks_local(text):
        raise CheckpointError(f"directory {text} does not exist{_suggestion(path)}")
    return None


def read_model_config(root: Path) -> tuple[dict[str, Any], ModelConfig]:
    """(raw config.json, ModelConfig) of a checkpoint directory; errors name `root/config.json`."""
    raw = read_config_json(root / "config.json")
    try:
        return raw, ModelConfig.from_dict(raw)
    except ConfigError as e:  # its messages start "config.json:"; say which one
        raise ConfigError(f"{root / 'config.json'}{str(e).removeprefix('config.json')}") from None


def _looks_local(text: str) -> bool:
    if text.startswith((".", "/", "~")) or "\\" in text or not HUB_ID.fullmatch(text):
        return True
    return Path(text.split("/")[0]).is_dir()


def _suggestion(path: Path) -> str:
    """ "; did you mean X?" for a sibling directory whose name is close to the missing one's."""
    parent = path.parent
    if not parent.is_dir():
        return ""
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.5)
    return f"; did you mean {parent / close[0]}?" if close else ""


def _download(repo: str) -> Path:
    """The hub snapshot of `repo` (the local cache when offline); errors say what the hub answered."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise CheckpointError(
            f"{repo} is a gated model on the Hugging Face hub: accept its terms on huggingface.co, then log "
            "in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"directory {repo} does not exist, and the Hugging Face hub has no model {repo!r} (if it is "
            "private, log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:  # offline by setting, or the hub could not be reached
        if constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE"):
            raise CheckpointError(
                f"directory {repo} does not exist (HF_HUB_OFFLINE is set, and it is not a downloaded hub model)"
            ) from None
        raise CheckpointError(
            f"directory {repo} does not exist, and the Hugging Face hub could not be reached to download "
            "it; if this machine is offline, download the checkpoint elsewhere and pass its local directory"
        ) from None
    except Exception as e:  # the hub client raises many more types; all mean "not available here"
        raise CheckpointError(
            f"could not download {repo!r} from the Hugging Face hub ({type(e).__name__}: {_first_line(e)})"
        ) from None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _header(path: Path) -> dict[str, Any]:
    """The safetensors header, checked against the file size so a truncated shard fails here, by name;
    each entry's `data_offsets` made absolute (file offsets, past the header)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path.name}: truncated safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path.name}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header")
    header.pop("__metadata__", None)
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
        for t in header.values():
            tuple(t["shape"]), str(t["dtype"])
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path.name}: corrupt safetensors header") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes, its header needs {8 + n + end})")
    for t in header.values():
        t["data_offsets"] = [8 + n + int(o) for o in t["data_offsets"]]
    return header


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    shape: tuple[int, ...]
    dtype: str
    span: tuple[int, int]  # the data's byte offsets in the file


class SafetensorsFiles:
    """All tensors of a checkpoint directory by file key, read lazily (a whole tensor, one leading-axis
    slice, or a region given as slices, of which only the bytes it covers are read). Shards come from the
    index when there is one, else from `model*.safetensors`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self._shards():
            for key, t in _header(shard).items():
                self.tensors[key] = TensorInfo(shard, tuple(t["shape"]), t["dtype"], tuple(t["data_offsets"]))
        self._open: dict[Path, Any] = {}

    def _shards(self) -> list[Path]:
        index = self.root / INDEX_FILE
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                if not all(isinstance(n, str) and n for n in names):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index") from None
            missing = [n for n in names if not (self.root / n).is_file()]
            if missing:
                raise CheckpointError(f"{self.root}: missing shard {missing[0]} named in {INDEX_FILE}")
            return [self.root / n for n in names]
        shards = sorted(self.root.glob("model*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.root}: no model*.safetensors files")
        return shards

    def read(self, key: str, index: Part = None) -> torch.Tensor:
        """The tensor `key`, its `index`-th slice along the first axis (an int), or the region that a tuple
        of slices selects (a rank's rows, columns or experts, engine/parallel.py)."""
        info = self.tensors[key]
        handle = self._open.get(info.shard)
        if handle is None:
            handle = self._open[info.shard] = safe_open(str(info.shard), framework="pt")
        if index is None:
            return handle.get_tensor(key)
        if isinstance(index, tuple):
            return handle.get_slice(key)[index]
        return handle.get_slice(key)[index : index + 1][0]

    def close(self) -> None:
        self._open.clear()


Part = int | tuple[slice, ...] | None  # one expert (or row) of the first axis, a region, or everything
Reader = Callable[[Part], torch.Tensor]


class Checkpoint:
    """A gpt-oss checkpoint seen through MLX names: `reader(name)(part)` returns one tensor (or one
    expert's slice of it, or a region of it) as the MLX layout stores it; `specs` says how each module is
    stored. A region of a published-layout expert tensor may cut only the expert axis (the others are
    re-laid on reading)."""

    def __init__(self, path_or_repo: str | Path) -> None:
        self.root = resolve(path_or_repo)
        self.raw_config, self.config = read_model_config(self.root)
        self.files = SafetensorsFiles(self.root)
        keys = set(self.files.tensors)
        self.layout = self._detect_layout()
        self.readers = self._mlx_readers() if self.layout == "mlx" else self._hf_readers()
        self.specs = self._specs(keys)
        self._check_names()

    def _detect_layout(self) -> str:
        """transformers 5 saves a dequantized MXFP4 model with float tensors under the `_blocks` names, in
        its in-memory (E, in, out) layout: that is the bf16 layout too."""
        for key, info in self.files.tensors.items():
            if key.endswith("experts.gate_up_proj_blocks"):
                return "hf-mxfp4" if info.dtype == "U8" else "hf-bf16"
            if key.endswith("experts.gate_up_proj"):
                return "hf-bf16"
        return "mlx"

    # ---- layout mapping ------------------------------------------------------------------------------
    def _mlx_readers(self) -> dict[str, Reader]:
        return {key: (lambda e, key=key: self.files.read(key, e)) for key in self.files.tensors}

    def _hf_readers(self) -> dict[str, Reader]:
        readers: dict[str, Reader] = {}
        for key in self.files.tensors:
            m = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)(_blocks|_scales|_bias|)", key)
            if m is None:
                readers[key] = lambda e, key=key: self.files.read(key, e)
            else:
                readers.update(self._expert_readers(key, m.group(1), m.group(2), m.group(3)))
        return readers

    def _expert_readers(self, key: str, prefix: str, proj: str, part: str) -> dict[str, Reader]:
        read = self.files.read
        if self.layout == "hf-bf16" and part == "_blocks":
            part = ""
        suffix = {"_blocks": "weight", "_scales": "scales", "_bias": "bias", "": "weight"}[part]
        if part == "_blocks":

            def fix(t: torch.Tensor) -> torch.Tensor:  # (…, R, nb, 16) u8 → (…, R, nb·4) u32, same bytes
                return mxfp4.blocks_to_mlx(t)
        elif part == "":

            def fix(t: torch.Tensor) -> torch.Tensor:  # transformers' (…, in, out) → MLX (…, out, in)
                return t.transpose(-1, -2)
        else:

            def fix(t: torch.Tensor) -> torch.Tensor:
                return t

        if proj == "down_proj":
            return {f"{prefix}.down_proj.{suffix}": lambda e: fix(read(key, e)).contiguous()}
        # Gate/up interleave: even rows are gate, odd rows up (on the last axis in transformers' layout,
        # which `fix` has already moved to the row axis).
        axis = -1 if part == "_bias" else -2
        shared = _ReadOnce(lambda e: fix(read(key, e)))
        return {
            f"{prefix}.gate_proj.{suffix}": lambda e: _rows(shared(e), 0, axis),
            f"{prefix}.up_proj.{suffix}": lambda e: _rows(shared(e), 1, axis),
        }

    def _specs(self, keys: set[str]) -> dict[str, QuantSpec | None]:
        if self.layout == "mlx":
            quant = self.raw_config.get("quantization")
            if (
                quant is None
                and isinstance(self.raw_config.get("quantization_config"), dict)
                and "bits" in self.raw_config["quantization_config"]
            ):
                quant = self.raw_config["quantization_config"]
            return specs_from_config(quant, self.config, set(self.readers))
        specs: dict[str, QuantSpec | None] = {m.path: None for m in linear_modules(self.config)}
        if self.layout == "hf-mxfp4":
            for m in linear_modules(self.config):
                if m.experts:
                    specs[m.path] = MXFP4_EXPERTS
        return specs

    def _check_names(self) -> None:
        expected = expected_tensors(self.config, self.specs)
        missing = sorted(set(expected) - set(self.readers))
        if missing:
            raise CheckpointError(f"{self.root}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
        extra = sorted(set(self.readers) - set(expected))
        if extra:
            raise CheckpointError(
                f"{self.root}: unexpected tensor {extra[0]} ({len(extra)} extra in all); "
                "the config and the weights disagree"
            )
        self.expected = expected

    # ---- reading -------------------------------------------------------------------------------------
    def names(self) -> Iterator[str]:
        """MLX names in mlx-lm's module order (formats.md §2.2)."""
        return iter(self.expected)

    def read(self, name: str, expert: Part = None) -> torch.Tensor:
        """Tensor `name` whole, its `expert`-th slice (an int), or the region a tuple of slices selects."""
        t = self.readers[name](expert)
        want = _part_shape(self.expected[name], expert)
        if tuple(t.shape) != tuple(want):
            where = f"{name}[{expert}]" if isinstance(expert, int) else name
            raise CheckpointError(f"{self.root}: tensor {where} has shape {tuple(t.shape)}, expected {tuple(want)}")
        return t

    def close(self) -> None:
        self.files.close()


class _ReadOnce:
    """A source tensor that two MLX tensors are cut from (gate and up of `gate_up_proj`). Read whole (the
    loader, which asks for gate then up), the first read keeps it and the second takes it, so it is read
    once. Per-expert slices (the converter, which streams every gate slice before any up slice) are read
    each time: keeping them would hold a whole layer's experts and break the converter's memory bound.
    A region (a rank's experts, which the loader also asks for gate then up) is kept like a whole read."""

    def __init__(self, read: Reader) -> None:
        self.read, self.kept, self.kept_part = read, None, None

    def __call__(self, expert: Part) -> torch.Tensor:
        if isinstance(expert, int):
            return self.read(expert)
        if self.kept is not None and self.kept_part == expert:
            t, self.kept = self.kept, None
            return t
        self.kept, self.kept_part = self.read(expert), expert
        return self.kept


def _part_shape(shape: tuple[int, ...], part: Part) -> tuple[int, ...]:
    """The shape of `part` of a tensor of `shape`."""
    if part is None:
        return tuple(shape)
    if isinstance(part, int):
        return tuple(shape[1:])
    return tuple(torch.empty(shape, device="meta")[part].shape)


def _rows(t: torch.Tensor, start: int, axis: int) -> torch.Tensor:
    index = [slice(None)] * t.dim()
    index[axis] = slice(start, None, 2)
    return t[tuple(index)].contiguous()
