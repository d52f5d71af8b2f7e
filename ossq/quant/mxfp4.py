"""MXFP4: 4-bit E2M1 elements sharing one E8M0 power-of-two scale per block of 32 (formats.md §1.7, §4.3).

Two byte layouts carry the same bits:
- Hugging Face gpt-oss: blocks uint8 `[..., nb, 16]` (low nibble = even element) and scales uint8
  `[..., nb]`;
- MLX `mode="mxfp4"`: weight uint32 `[..., K/8]` — the same bytes viewed as little-endian words — and
  scales uint8 `[..., K/32]`.

Decoding is exact (an E2M1 value has at most two significant bits), so one decoder serves both layouts.
There are two encoders because two rules exist: `encode_blocks` follows the OCP MX rule (scale from
floor(log2 amax), round-to-nearest-even elements) used to synthesize gpt-oss-like checkpoints, and
`quantize` reproduces MLX's own `mode="mxfp4"` quantizer bit for bit. The rules differ, so decoding and
re-quantizing with MLX is not a round trip (formats.md §7.20).
"""

import functools
from collections.abc import Callable

import torch

from ossq.errors import UnsupportedQuantization
from ossq.quant.affine import chunk_elements

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BITS = 4  # an E2M1 element
BLOCK = 32  # elements per shared scale
SCALE_BIAS = 127  # E8M0: byte s means 2^(s - 127)
CHUNK_ELEMENTS = 1 << 20  # elements per chunk; bounds the temporaries
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive |E2M1| values


def check(k: int) -> None:
    """Raise UnsupportedQuantization unless a row of k elements splits into whole MXFP4 blocks."""
    if k % BLOCK:
        raise UnsupportedQuantization(f"mxfp4 needs in_features divisible by {BLOCK}, not {k}")


def decode_blocks(blocks: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Hugging Face layout → values: blocks uint8 `[..., nb, 16]`, scales uint8 `[..., nb]` → `[..., nb*32]`.

    Value = E2M1[code]·2^(s−127), computed exactly in float32 and rounded once to dtype, which equals
    transformers' `convert_moe_packed_tensors` (before its transpose) and `mx.dequantize(mode="mxfp4")`.
    As in MLX, s = 0 means 2^−127 and s = 255 means +inf. Works in chunks of about CHUNK_ELEMENTS outputs;
    peak extra memory is about 16 bytes per chunk element.
    """
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise UnsupportedQuantization(
            f"mxfp4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} "
            "do not match [..., nb, 16] and [..., nb]"
        )
    flat_blocks, flat_scales = blocks.reshape(-1, BLOCK // 2), scales.reshape(-1)
    pairs = _pair_table(blocks.device)
    out = torch.empty(flat_scales.shape[0], BLOCK, dtype=dtype, device=blocks.device)
    step = max(1, chunk_elements(blocks.device) // BLOCK)
    for b0 in range(0, flat_scales.shape[0], step):
        b1 = min(b0 + step, flat_scales.shape[0])
        values = pairs[flat_blocks[b0:b1].int()].reshape(b1 - b0, BLOCK)  # [n, 32] float32
        out[b0:b1] = values * _e8m0(flat_scales[b0:b1])[:, None]
    return out.reshape(*scales.shape[:-1], -1)


def decode(weight: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MLX layout → values: weight uint32 `[..., K/8]`, scales uint8 `[..., K/32]` → `[..., K]`.

    Equals `mx.dequantize(w, scales, mode="mxfp4", group_size=32, bits=4, dtype=...)` for bfloat16 and
    float32 (MLX also defaults to bfloat16). For float16, MLX rounds 2^(s−127) to float16 before the
    multiply, so the two can differ where that power under- or overflows float16.
    """
    return decode_blocks(mlx_to_blocks(weight), scales, dtype=dtype)


def blocks_to_mlx(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 blocks `[..., nb, 16]` → the same bytes as uint32 `[..., nb*4]` (little-endian words)."""
    return blocks.contiguous().view(torch.uint32).reshape(*blocks.shape[:-2], -1)


def mlx_to_blocks(weight: torch.Tensor) -> torch.Tensor:
    """uint32 `[..., K/8]` → the same bytes as uint8 blocks `[..., K/32, 16]`; inverse of blocks_to_mlx."""
    check(weight.shape[-1] * 8)
    return weight.contiguous().view(torch.uint8).reshape(*weight.shape[:-1], -1, BLOCK // 2)


def encode_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values `[..., K]` → Hugging Face (blocks uint8 `[..., K/32, 16]`, scales uint8 `[..., K/32]`).

    OCP MX rule: scale exponent floor(log2 amax) − 2 (clamped to the E8M0 range; 0 for an all-zero block),
    so amax/2^e ∈ [4, 8); elements round to the nearest E2M1 value, ties to the even code, and saturate at
    ±6; the sign bit is kept, so −0.0 stays −0.0. Values already on a block's grid are reproduced exactly.
    Works in chunks of CHUNK_ELEMENTS/4 elements; peak extra memory is about 64 bytes per chunk element.
    """
    check(w.shape[-1])
    return _encode_chunked(w, _encode_rows, CHUNK_ELEMENTS // 4)


def _encode_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks `[n, 32]` → (packed uint8 `[n, 16]`, E8M0 uint8 `[n]`) by the OCP rule, in float32."""
    g = g.float()
    amax = g.abs().amax(-1)
    _, exp = torch.frexp(amax)  # amax = m·2^exp with m ∈ [0.5, 1): floor(log2 amax) = exp − 1
    e = torch.where(amax > 0, exp - 3, torch.zeros_like(exp)).clamp(-SCALE_BIAS, SCALE_BIAS)
    y = g / torch.exp2(e.double())[:, None].float()  # exact: a power of two in float32's range
    mag = y.abs().clamp(max=6.0)
    mids = torch.tensor(_MIDPOINTS, device=g.device)
    lo = torch.searchsorted(mids, mag, right=False)  # == hi except on a midpoint
    hi = torch.searchsorted(mids, mag, right=True)
    code = torch.where(lo == hi, lo, lo + (lo & 1)) | (torch.signbit(y).long() << 3)
    return _pack_nibbles(code), (e + SCALE_BIAS).to(torch.uint8)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLX's own rule: values `[..., K]` → (uint32 `[..., K/8]`, E8M0 uint8 `[..., K/32]`).

    Bit-identical to CPU `mx.quantize(w, mode="mxfp4", group_size=32, bits=4)` of mlx 0.32.4 (found by
    experiment; mlx ≤ 0.32.2 rounded log2 instead, formats.md §1.7): in w's dtype, a = max|x|/6; e = the
    smallest integer with 2^e ≥ a (0 when a = 0), so no element saturates; y = x / 2^e; code = the first
    LUT index minimising |y − LUT| (ties go toward zero, and −0 and small negatives get +0); scale byte =
    (e + 127) mod 256. Works in chunks of CHUNK_ELEMENTS/16 elements (the LUT distance is 16 wide); peak
    extra memory is about 100 bytes per chunk element (≈ 6 MiB).
    """
    check(w.shape[-1])
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedQuantization(f"mxfp4 quantization needs a float16/bfloat16/float32 weight, not {w.dtype}")
    blocks, scales = _encode_chunked(w, _mlx_quantize_rows, CHUNK_ELEMENTS // 16)
    return blocks_to_mlx(blocks), scales


def _encode_chunked(
    w: torch.Tensor,
    encode_rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    chunk_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map encode_rows over the blocks of w `[..., K]` → (blocks `[..., K/32, 16]`, scales `[..., K/32]`)."""
    g = w.reshape(-1, BLOCK)
    blocks = torch.empty(g.shape[0], BLOCK // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(g.shape[0], dtype=torch.uint8, device=w.device)
    step = max(1, chunk_elements // BLOCK)
    for b0 in range(0, g.shape[0], step):
        blocks[b0 : b0 + step], scales[b0 : b0 + step] = encode_rows(g[b0 : b0 + step])
    lead = w.shape[:-1]
    return blocks.reshape(*lead, -1, BLOCK // 2), scales.reshape(*lead, -1)


def _mlx_quantize_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks `[n, 32]` in the input dtype → (packed uint8 `[n, 16]`, E8M0 uint8 `[n]`) by MLX's rule."""
    a = g.abs().amax(-1)
    a = a / torch.full_like(a, 6.0)  # rounded to the input dtype, as in mlx
    mant, exp = torch.frexp(a.float())  # a = mant·2^exp, mant ∈ [0.5, 1): exact, unlike a rounded log2
    e = torch.where(mant == 0.5, exp - 1, exp).long()  # ceil(log2 a)
    e = torch.where(a == 0, torch.zeros_like(e), e)
    y = g / torch.exp2(e.double()).to(g.dtype)[:, None]
    lut = torch.tensor(E2M1, dtype=g.dtype, device=g.device)
    code = (y[..., None] - lut).abs_().argmin(-1)  # first minimum, as mlx's argmin
    return _pack_nibbles(code), ((e + SCALE_BIAS) & 0xFF).to(torch.uint8)


def _pack_nibbles(code: torch.Tensor) -> torch.Tensor:
    """Integer codes `[n, 32]` in [0, 16) → uint8 `[n, 16]`, even element in the low nibble."""
    return (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)


@functools.cache
def _pair_table(device: torch.device) -> torch.Tensor:
    """float32 `[256, 2]`: byte → (value of low nibble, value of high nibble); built once per device."""
    lut = torch.tensor(E2M1, dtype=torch.float32, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([lut[byte & 0x0F], lut[byte >> 4]], -1)


def _e8m0(s: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes → float32 2^(s−127) built from bits: s = 0 → 2^−127 (a subnormal), 255 → +inf."""
    return torch.where(s == 0, 0x00400000, s.int() << 23).view(torch.float32)
