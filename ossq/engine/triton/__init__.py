"""Triton kernels behind the ops interface (ossq/engine/ops.py): quantized matmul from the stored layout
(qmm.py), the decode mixture of experts (moe.py), paged decode attention with sinks (attention.py), and
`TritonOps` (ops.py), which uses them where they apply and TorchOps elsewhere.

Importing this package imports triton; `select_ops("triton")` is the only place that does so. Without a
GPU the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set before the import), which is
how the tests check them against TorchOps.
"""

from ossq.engine.triton.ops import TritonOps

__all__ = ["TritonOps"]
