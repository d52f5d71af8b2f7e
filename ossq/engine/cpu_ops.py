"""CPU ops: quantized weights re-laid once at load so that decoding does not dequantize them every step.

`TorchOps` (engine/ops.py) dequantizes every weight it touches on every call, which makes a quantized
model decode several times slower than the unquantized one on the CPU. `CpuOps.prepare` gives each
quantized weight, within a memory bound, a form that runs at unquantized speed or better:

- bfloat16 activations: torch's packed 4-bit CPU kernel (`aten._weight_int4pack_mm_for_cpu`), which
  computes x·Wᵀ with W = (c − 8)·scale + zero per group of G from 4-bit codes c. A weight is written as
  a sum of such planes, each giving digit·scale + offset (the digit is centred on 8 so that the rounded
  zero sits mid-range): an MLX affine weight s·q + b with q < 16 (2, 3, 4 bits) is one plane (q, s, b);
  wider codes (5, 6, 8 bits) split as q = 2^m·hi + lo with m = bits − 4, into (hi, 2^m·s, b + μs) and
  (lo, s, −μs), μ the mean of lo, so the second plane's output, and its rounding, stays small. MXFP4 is
  two planes because 2·E2M1 is an integer v in [−12, 12]: with σ = 2^(e−128), w = σ·v = σ·clamp(v, −8, 7)
  + σ·r, r ∈ {−4, 0, 1, 5} and mostly 0. Each plane's output is rounded to bfloat16 and the planes'
  sum once more, so two planes carry a little more rounding than the reference in bfloat16
  (tests/test_cpu_ops.py bounds it at 1.5×).
- float32 (the CPU default) and float16 activations: the dequantized weight cached in the activation
  dtype, bit-identical to what `TorchOps` computes each step. (The packed kernel accepts float32 and
  float16 too, but ran 6–21× slower than a dense matmul there: benchmarks/cpu-quantized.md.)

The mixture of experts runs each hit expert once over all of its tokens (on the CPU reading the routing
back costs nothing), through the expert's form or, without one, the reference dequantization of that
expert alone. Everything else (norms, RoPE, attention, unquantized weights) is `TorchOps`'s.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ossq.engine.ops import ExpertWeights, MoEWeights, QuantizedWeight, TorchOps, dequantize
from ossq.quant import affine, mxfp4
from ossq.quant.spec import QuantSpec

DEFAULT_CACHE_FRACTION = 1 / 8
# Activation dtypes for which the packed 4-bit kernel beats a dense matmul (measured: only bfloat16 has a
# vectorised path in torch 2.13; in float32 and float16 it ran 6–21× slower than dense).
INT4_DTYPES = (torch.bfloat16,)
INT4_ROW_MULTIPLE = 16  # the kernel needs a multiple of 16 output rows …
PACK_BLOCK_ROWS = 64  # … and packs blocks of 64 rows independently, so rows are packed 64·m at a time
_HAS_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def default_cache_bytes() -> int:
    """DEFAULT_CACHE_FRACTION of this machine's physical memory."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * DEFAULT_CACHE_FRACTION)


@dataclass(frozen=True)
class Int4Planes:
    """A weight (*lead, N, K) as 4-bit digit planes for `_weight_int4pack_mm_for_cpu`: each plane is packed
    codes uint8 (*lead, N, K/2) with scale-and-zero (*lead, K/G, N, 2) in the activation dtype; the weight
    is the sum of the planes' (c − 8)·scale + zero."""

    packed: tuple[Tensor, ...]
    scale_zeros: tuple[Tensor, ...]
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.packed, *self.scale_zeros))

    def matmul(self, x: Tensor, expert: int | None = None) -> Tensor:
        """x (M, K) → (M, N) = x Wᵀ, through expert `expert` of a stack."""
        pick = (lambda t: t) if expert is None else (lambda t: t[expert])
        x = x.contiguous()  # the kernel refuses strided activations
        ys = [
            torch.ops.aten._weight_int4pack_mm_for_cpu(x, pick(p), self.group_size, pick(sz))
            for p, sz in zip(self.packed, self.scale_zeros, strict=True)
        ]
        return ys[0] if len(ys) == 1 else ys[0] + ys[1]  # one rounding of the float32 sum


Form = Tensor | Int4Planes  # a dense weight in the activation dtype, or packed planes


class CpuOps(TorchOps):
    """`TorchOps` with quantized weights re-laid at load (module docstring: the forms). `forms` maps each
    re-laid Linear to its form; `cached_bytes` is their total size.

    Memory rule: the forms together take at most `max_cache_bytes` (default: DEFAULT_CACHE_FRACTION of
    the machine's RAM), on top of the stored weights, which stay as they are (any ops can still run the
    model). Weights are taken in the order of the share of their elements the reference dequantizes per
    decoded token (a linear layer: all of them; an expert stack: k/E; the embedding: one row in V),
    smaller first among equals (per-call overhead makes a small weight the larger win per byte); a weight
    whose form does not fit stays on the reference path and the next is tried. A packed form costs about
    the stored bytes (a byte per weight with two planes), a cached one the full-precision bytes; the
    embedding is only ever cached. Building the forms needs, beyond them, about 40 bytes per
    `affine.CHUNK_ELEMENTS` element (packed planes are built in blocks of rows, dequantizing is chunked).
    """

    name = "cpu"

    def __init__(self, max_cache_bytes: int | None = None) -> None:
        self.max_cache_bytes = default_cache_bytes() if max_cache_bytes is None else max_cache_bytes
        self.forms: dict[QuantizedWeight, Form] = {}
        self.cached_bytes = 0

    def prepare(self, model: nn.Module) -> None:
        """Give the quantized weights of `model` their forms, by the memory rule, in `model.dtype`."""
        self.forms, self.cached_bytes = {}, 0
        for lin, gather in _by_win_per_byte(model):
            size = form_bytes(lin, model.dtype, gather=gather)
            if self.cached_bytes + size <= self.max_cache_bytes:
                self.forms[lin] = make_form(lin, model.dtype, gather=gather)
                self.cached_bytes += size

    def linear(self, x: Tensor, lin: QuantizedWeight) -> Tensor:
        form = self._form(lin, x.dtype)
        if form is None:
            return super().linear(x, lin)
        lead = x.shape[:-1]
        y = _matmul(x.reshape(-1, x.shape[-1]), form, lin.bias)
        return y.reshape(*lead, -1)

    def embedding(self, ids: Tensor, emb: QuantizedWeight, dtype: torch.dtype) -> Tensor:
        form = self._form(emb, dtype)
        if not isinstance(form, Tensor):
            return super().embedding(ids, emb, dtype)
        return F.embedding(ids, form)

    def moe(self, x: Tensor, mlp: MoEWeights, *, top_k: int, limit: float, alpha: float) -> Tensor:
        """As `TorchOps.moe` (formats.md §4.7 g–i), each hit expert once over all its tokens; x (N, C)."""
        logits = self.linear(x, mlp.router)  # (N, E)
        top_v, top_i = torch.topk(logits, top_k, dim=-1)  # (N, k)
        weights = torch.softmax(top_v.float(), dim=-1).to(x.dtype).reshape(-1)  # (N k,)
        if x.shape[0] == 1:  # one token (decode of one sequence): no grouping to do
            ys = [self._expert(x, mlp.experts, e, limit=limit, alpha=alpha) for e in top_i[0].tolist()]
            return sum(y * weights[slot] for slot, y in enumerate(ys))
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pair indices grouped by expert
        counts = torch.bincount(flat, minlength=logits.shape[-1]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            pairs, start = order[start : start + n], start + n
            if n:
                tok = pairs // top_k
                y = self._expert(x[tok], mlp.experts, e, limit=limit, alpha=alpha)
                out.index_add_(0, tok, y * weights[pairs, None])
        return out

    def _expert(self, h: Tensor, experts: ExpertWeights, e: int, *, limit: float, alpha: float) -> Tensor:
        """Clamped SwiGLU expert e, exactly as TorchOps computes it: h (n, C) → (n, C)."""
        gate = self._expert_linear(h, experts.gate_proj, e).clamp(max=limit)
        up = self._expert_linear(h, experts.up_proj, e).clamp(-limit, limit)
        act = gate * torch.sigmoid(gate * alpha) * (up + 1)
        return self._expert_linear(act, experts.down_proj, e)

    def _expert_linear(self, h: Tensor, lin: QuantizedWeight, e: int) -> Tensor:
        form = self._form(lin, h.dtype)
        if form is None:
            return F.linear(h, dequantize(lin, e, dtype=h.dtype), lin.bias[e])
        if isinstance(form, Tensor):
            return F.linear(h, form[e], lin.bias[e])
        return form.matmul(h, e) + lin.bias[e]

    def _form(self, lin: QuantizedWeight, dtype: torch.dtype) -> Form | None:
        form = self.forms.get(lin)
        if form is None or _form_dtype(form) != dtype:
            return None
        return form


def _matmul(x: Tensor, form: Form, bias: Tensor | None) -> Tensor:
    if isinstance(form, Tensor):
        return F.linear(x, form, bias)
    y = form.matmul(x)
    return y if bias is None else y + bias


def _form_dtype(form: Form) -> torch.dtype:
    return form.dtype if isinstance(form, Tensor) else form.scale_zeros[0].dtype


# ---- which weights, in which order ---------------------------------------------------------------------
def _by_win_per_byte(model: nn.Module) -> list[tuple[QuantizedWeight, bool]]:
    """The quantized Linears of `model`, each with whether it is gathered from (the embedding), in the order
    of the share of their elements the reference dequantizes per decoded token, then smallest first."""
    config = model.config
    expert_share = config.num_experts_per_tok / config.num_local_experts
    embed = model.model.embed_tokens
    found = []
    for m in model.modules():
        if getattr(m, "spec", None) is None or not hasattr(m, "weight"):
            continue
        share = 1 / m.weight.shape[0] if m is embed else expert_share if m.weight.dim() == 3 else 1.0
        found.append((-share, _numel(m), m))  # largest share first, then smallest
    found.sort(key=lambda f: f[:2])
    return [(m, m is embed) for _, _, m in found]


def _numel(lin: QuantizedWeight) -> int:
    w = lin.weight
    return w.numel() * 32 // lin.spec.bits


def form_bytes(lin: QuantizedWeight, dtype: torch.dtype, *, gather: bool = False) -> int:
    """Bytes the form of `lin` in `dtype` takes (what `make_form` would build)."""
    *lead, n, _ = lin.weight.shape
    k = lin.weight.shape[-1] * 32 // lin.spec.bits
    if not gather and _packable(lin, dtype):
        planes = _planes_of(lin.spec)
        per_plane = n * k // 2 + (k // lin.spec.group_size) * n * 2 * dtype.itemsize
        return planes * per_plane * math.prod(lead)
    return _numel(lin) * dtype.itemsize


def make_form(lin: QuantizedWeight, dtype: torch.dtype, *, gather: bool = False) -> Form:
    """Packed planes where the kernel applies and wins (never for a weight that is `gather`ed from, as
    the embedding), else the dequantized weight in `dtype`."""
    if not gather and _packable(lin, dtype):
        return _int4_planes(lin, dtype)
    return dequantize(lin, dtype=dtype)


def _packable(lin: QuantizedWeight, dtype: torch.dtype) -> bool:
    if not _HAS_INT4 or dtype not in INT4_DTYPES or lin.weight.shape[-2] % INT4_ROW_MULTIPLE:
        return False
    if lin.spec.mode == "mxfp4":
        # σ = 2^(e−128) and 12σ must be normal, finite bfloat16s (real checkpoints sit far inside this range).
        return bool(((lin.scales >= 2) & (lin.scales <= 240)).all())
    return True


# ---- the packed planes ---------------------------------------------------------------------------------
_E2M1_DOUBLED = [int(2 * v) for v in mxfp4.E2M1]


def _planes_of(spec: QuantSpec) -> int:
    return 1 if spec.mode == "affine" and spec.bits <= 4 else 2


def _int4_planes(lin: QuantizedWeight, dtype: torch.dtype) -> Int4Planes:
    """The digit planes of an affine or MXFP4 `lin` (module docstring gives the algebra), built matrix by
    matrix in blocks of rows: beyond the planes themselves, about 40 bytes per CHUNK_ELEMENTS element."""
    spec = lin.spec
    *lead, n, words = lin.weight.shape
    k, g = words * 32 // spec.bits, spec.group_size
    packed = [torch.empty(*lead, n, k // 2, dtype=torch.uint8) for _ in range(_planes_of(spec))]
    scale_zeros = [torch.empty(*lead, k // g, n, 2, dtype=dtype) for _ in packed]
    flat = [None if t is None else t.reshape(-1, n, t.shape[-1]) for t in (lin.weight, lin.scales, lin.biases)]
    step = max(1, affine.CHUNK_ELEMENTS // k // PACK_BLOCK_ROWS) * PACK_BLOCK_ROWS
    for e in range(flat[0].shape[0]):
        for r0 in range(0, n, step):
            rows = slice(r0, r0 + step)
            chunk = [None if t is None else t[e, rows] for t in flat]
            for i, digit in enumerate(_digits(spec, *chunk)):
                codes, sz = _plane(*digit, dtype=dtype)
                packed[i].view(-1, n, k // 2)[e, rows] = codes
                scale_zeros[i].view(-1, k // g, n, 2)[e, :, rows] = sz
    return Int4Planes(tuple(packed), tuple(scale_zeros), g)


def _digits(spec: QuantSpec, weight: Tensor, scales: Tensor, biases: Tensor | None) -> list[tuple]:
    """Rows (R, ·) of a stored weight → its planes as (digit (R, K), digit bits, scale (R, K/G), offset):
    the weight is the sum over planes of digit·scale + offset."""
    if spec.mode == "mxfp4":
        nibbles = weight.contiguous().view(torch.uint8)  # (R, K/2), even element in the low nibble
        codes = torch.stack((nibbles & 0xF, nibbles >> 4), -1).flatten(-2).long()
        v2 = torch.tensor(_E2M1_DOUBLED, dtype=torch.int8)[codes]  # (R, K): 2·E2M1, an integer in [−12, 12]
        sigma = torch.exp2(scales.float() - 128)  # 2^(e−127)/2, exact powers of two
        coarse = v2.clamp(-8, 7)
        rest = v2 - coarse  # −4, 0, 1 or 5, and mostly 0
        return [(coarse + 8, 4, sigma, -8 * sigma), (rest + 4, 4, sigma, -4 * sigma)]
    q = affine.unpack(weight, spec.bits)  # (R, K) uint8
    s, b = scales.float(), biases.float()
    shift = max(spec.bits - 4, 0)
    if not shift:
        return [(q, spec.bits, s, b)]
    mid = (2**shift - 1) / 2  # the low digit's mean, moved into the high plane
    return [(q >> shift, 4, 2**shift * s, b + mid * s), (q & (2**shift - 1), shift, s, -mid * s)]


def _plane(digit: Tensor, width: int, scale: Tensor, offset: Tensor, *, dtype: torch.dtype):
    """One plane contributing digit·scale + offset per element, digit of `width` bits → (packed codes,
    scale-and-zero). The digit is centred on the kernel's 8 (c = digit + 8 − 2^(width−1)), so the rounded
    zero sits mid-range of the values it produces, not past their end (for 2 bits: 10× less error)."""
    half = 2 ** (width - 1)
    codes = digit.int() + (8 - half)  # [0, 16)
    zero = half * scale + offset  # (c − 8)·scale + zero = digit·scale + offset
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return packed, torch.stack((scale.T, zero.T), -1).to(dtype)  # (K/G, R, 2)
