"""Device facts, in one place: which device a `--device` value names (and whether this machine has it),
the dtype ossq computes in there, and the one probe of peak memory that every command reports.

Only `cpu` and `cuda` (`cuda:N`) are supported: the engine's fast paths are CUDA kernels and its
reference path is plain CPU torch.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import torch

from ossq.errors import DeviceError

SUPPORTED = ("cpu", "cuda")


def available_devices() -> list[str]:
    """What `--device` accepts here: `cpu`, then `cuda` and `cuda:0` … `cuda:N-1` when CUDA works."""
    if not torch.cuda.is_available():
        return ["cpu"]
    return ["cpu", "cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device `name` names, checked against this machine; None means cuda when available, else cpu.

    Raises DeviceError, one line naming the device and what is available, for an unknown name, a device
    type ossq does not run on, CUDA on a torch built without it or with no GPU visible, or a GPU index
    past the last one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ", ".join(available_devices())
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(name)!r}; available: {available}") from None
    if device.type not in SUPPORTED:
        raise DeviceError(f"ossq does not run on device {str(name)!r} (only cpu and cuda); available: {available}")
    if device.type == "cuda":
        _check_cuda(device, str(name), available)
    return device


def _check_cuda(device: torch.device, name: str, available: str) -> None:
    if torch.version.cuda is None:
        raise DeviceError(f"device {name!r} is not available here (torch has no CUDA); available: {available}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} is not available here (no CUDA GPU is visible); available: {available}")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {name!r} is not available here ({count} CUDA GPU(s)); available: {available}")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is fast (CUDA); float32 on CPU, where bf16 matmuls are slow and tests want fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def peak_rss_bytes() -> int:
    """This process's peak resident set since start (or since `MemoryMeter.reset` on Linux). Linux:
    VmHWM, because `ru_maxrss` also counts the image of the parent that forked us before `exec`."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class MemoryMeter:
    """Peak memory since the last `reset`: allocated CUDA memory on a CUDA device, otherwise the process's
    peak RSS (Linux's VmHWM, which writing "5" to /proc/self/clear_refs resets; elsewhere, or where that
    is not permitted, the lifetime peak, so a later measurement may show an earlier one's peak)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()

    def peak_gb(self) -> float:
        """`peak_bytes` in GB (1e9 bytes)."""
        return self.peak_bytes() / 1e9
