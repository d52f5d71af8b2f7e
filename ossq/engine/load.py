"""Checkpoint directory or hub id → GptOss on a device.

Buffers are allocated once, directly on the target device, and filled one checkpoint tensor at a time,
so peak host memory is one tensor (for the published layout's experts, one `gate_up_proj` tensor, read
once and cut into its gate and up halves). The match between checkpoint names and model buffers is strict:
formats/hf.py has already failed loudly on a missing or extra tensor or a wrong shape; here a packed
tensor of the wrong dtype fails too (mlx-lm would load it silently, formats.md §7.21).

With `parallel` (engine/parallel.py) the buffers have the rank's shard shapes and each is filled with
only the slice of its checkpoint tensor that the rank holds, read as such: no rank reads the whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ossq.device import default_dtype, resolve_device
from ossq.engine.model import GptOss
from ossq.engine.ops import Ops, select_ops
from ossq.engine.parallel import SINGLE, Parallel, Shard
from ossq.errors import CheckpointError
from ossq.formats.hf import Checkpoint


def load_model(
    path_or_repo: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    ops: Ops | str | None = None,
    parallel: Parallel = SINGLE,
) -> tuple[GptOss, Path]:
    """The model (this rank's shard of it, with `parallel`) and the resolved checkpoint directory. `ops` is
    an implementation or its name (engine/ops.py); its `prepare` hook runs once the weights are in."""
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    ops = select_ops(ops or parallel.default_ops(device), device) if ops is None or isinstance(ops, str) else ops
    parallel.check_ops(ops)
    ckpt = Checkpoint(path_or_repo)
    try:
        with torch.device(device):
            model = GptOss(ckpt.config, ckpt.specs, dtype=dtype, ops=ops, parallel=parallel)
        buffers = dict(model.named_buffers())
        assert set(ckpt.expected) <= set(buffers), "model and checkpoint name sets diverged"
        for name in ckpt.names():
            shard = parallel.shard(name, ckpt.expected[name], ckpt.config)
            if not shard.zero:  # zero: the buffer stays as allocated (engine/parallel.py)
                _fill(buffers[name], _read(ckpt, name, shard), name)
        del buffers  # prepare may replace buffers: the old ones must go as it does
    finally:
        ckpt.close()
    ops.prepare(model)
    return model.eval(), ckpt.root


def _read(ckpt: Checkpoint, name: str, shard: Shard) -> torch.Tensor:
    """What `shard` selects of tensor `name`: a region, or rows in a given order (one read per row)."""
    ndim = len(ckpt.expected[name])
    if shard.rows is None:
        return ckpt.read(name, shard.index(ndim))
    rest = (slice(None),) * (ndim - 1)
    return torch.cat([ckpt.read(name, (slice(i, i + 1), *rest)) for i in shard.rows])


def _fill(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if target.dtype.is_floating_point != source.dtype.is_floating_point or (
        not target.dtype.is_floating_point and target.dtype != source.dtype
    ):
        raise CheckpointError(f"tensor {name} has dtype {source.dtype}, expected {target.dtype}")
    target.copy_(source)
