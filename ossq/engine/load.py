"""Checkpoint directory or hub id → GptOss on a device.

Buffers are allocated once, directly on the target device, and filled one checkpoint tensor at a time,
so peak host memory is one tensor (for the published layout's experts, one `gate_up_proj` tensor, read
once and cut into its gate and up halves). The match between checkpoint names and model buffers is strict:
formats/hf.py has already failed loudly on a missing or extra tensor or a wrong shape; here a packed
tensor of the wrong dtype fails too (mlx-lm would load it silently, formats.md §7.21).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ossq.device import default_dtype, resolve_device
from ossq.engine.model import GptOss
from ossq.engine.ops import Ops, select_ops
from ossq.errors import CheckpointError
from ossq.formats.hf import Checkpoint


def load_model(
    path_or_repo: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    ops: Ops | str | None = None,
) -> tuple[GptOss, Path]:
    """The model and the resolved checkpoint directory. `ops` is an implementation or its name
    (engine/ops.py); its `prepare` hook runs once the weights are in."""
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    ops = select_ops(ops, device) if ops is None or isinstance(ops, str) else ops
    ckpt = Checkpoint(path_or_repo)
    try:
        with torch.device(device):
            model = GptOss(ckpt.config, ckpt.specs, dtype=dtype, ops=ops)
        buffers = dict(model.named_buffers())
        assert set(ckpt.expected) <= set(buffers), "model and checkpoint name sets diverged"
        for name in ckpt.names():
            _fill(buffers[name], ckpt.read(name), name)
        del buffers  # prepare may replace buffers: the old ones must go as it does
    finally:
        ckpt.close()
    ops.prepare(model)
    return model.eval(), ckpt.root


def _fill(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if target.dtype.is_floating_point != source.dtype.is_floating_point or (
        not target.dtype.is_floating_point and target.dtype != source.dtype
    ):
        raise CheckpointError(f"tensor {name} has dtype {source.dtype}, expected {target.dtype}")
    target.copy_(source)
