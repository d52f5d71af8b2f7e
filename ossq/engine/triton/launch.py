"""Programmatic dependent launch (PDL, Hopper and later): the next kernel of a decode step starts while the
current one drains, instead of after it.

A decode step is a few hundred kernels of a few microseconds each, so the gap at each boundary (the last
programs finishing, the next grid being launched and its programs starting) is a large share of the step.
With PDL each kernel signals at its start that its dependents may launch, and waits at its start for the
kernel before it to have completed (and its writes to be visible): the next grid's programs are resident
and waiting by the time the current grid ends. Every kernel here calls `wait_for_inputs` before it reads
or writes anything, so the order of memory effects is exactly the stream order. torch's own kernels in
between neither signal nor are launched this way, so around them the boundary is an ordinary one.

On by default where the device supports it; OSSQ_PDL=0 turns it off (to measure what it gives). The
interpreter never sees it.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

PDL_ENV = "OSSQ_PDL"


@functools.cache
def _pdl(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get(PDL_ENV, "1") == "0":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def launch_args(device: torch.device) -> dict:
    """The keyword arguments of a kernel launch on `device`: the `PDL` constexpr, and Triton's launch flag
    where it is on."""
    return {"PDL": True, "launch_pdl": True} if _pdl(device) else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one: call first in every kernel."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
