"""Launch each decode kernel of interest a few times at 20b shapes, for ncu to profile."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))
from types import SimpleNamespace

import torch

from benchmarks.kernels import SPECS, qmm_call, random_linear
from ossq.engine.triton import moe

torch.manual_seed(0)
x = torch.randn(1, 2880, device="cuda").bfloat16()
for n, k in [(201088, 2880), (5120, 2880), (2880, 4096)]:
    lin = random_linear(SPECS["4b-g64"], (), n, k, bias=n != 201088)
    xx = torch.randn(1, k, device="cuda").bfloat16()
    for _ in range(2):
        qmm_call(xx, lin, None)
spec = SPECS["mxfp4"]
ex = SimpleNamespace(
    gate_proj=random_linear(spec, (32,), 2880, 2880),
    up_proj=random_linear(spec, (32,), 2880, 2880),
    down_proj=random_linear(spec, (32,), 2880, 2880),
)
top_i = torch.tensor([[3, 9, 17, 30]], device="cuda")
route = torch.rand(1, 4, device="cuda")
for _ in range(2):
    moe.experts(x, ex, top_i, route, limit=7.0, alpha=1.702)
torch.cuda.synchronize()
print("ok")
