"""MLX affine group quantization, bit-identical to CPU `mx.quantize(w, group_size, bits, mode="affine")`.

A weight row of K elements is cut into K/G groups of G consecutive elements; each group stores b-bit codes
q and a (scale, bias) pair in the weight's dtype so that w ≈ scale·q + bias. The rules mirror
`quantize<T,U>` in mlx/backend/cpu/quantized.cpp (formats.md §1.2): everything in float32, true division
(never a reciprocal multiply), round-half-to-even, and the codes use the *unrounded* float32 scale and bias
while the stored ones are rounded to the weight dtype. Scales are negative whenever the positive side of a
group dominates, so no code here assumes scale > 0.

Packing (formats.md §1.3): each row's codes form one little-endian, LSB-first bitstream, stored as uint32
words. Eight codes of b bits fill exactly b bytes, so every width packs and unpacks through 8-code units.

Divisors are always full tensors, not Python scalars: PyTorch may replace division by a scalar with a
reciprocal multiply (CUDA does), which would break bit-exactness.
"""

import torch

from ossq.errors import UnsupportedQuantization

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
CHUNK_ELEMENTS = 1 << 20  # elements per row chunk; bounds the temporaries of quantize/dequantize
# On a GPU each chunk costs dozens of kernel launches and memory is plentiful: dequantizing runs in fewer,
# larger chunks there (≈ 2 GB of temporaries at most).
GPU_CHUNK_ELEMENTS = 1 << 26


def chunk_elements(device: torch.device) -> int:
    """Elements per chunk when dequantizing on `device`."""
    return CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS


_MIN_SCALE = 1e-7  # mlx's floor on |scale| (a float32 literal there)


def check(bits: int, group_size: int, in_features: int | None = None) -> None:
    """Raise UnsupportedQuantization unless (bits, group_size[, in_features]) is an MLX affine setting."""
    if bits not in BITS:
        raise UnsupportedQuantization(f"affine quantization supports bits in {BITS}, not {bits}")
    if group_size not in GROUP_SIZES:
        raise UnsupportedQuantization(f"affine quantization supports group_size in {GROUP_SIZES}, not {group_size}")
    if in_features is not None and in_features % group_size != 0:
        raise UnsupportedQuantization(
            f"in_features {in_features} is not divisible by group_size {group_size}; "
            f"choose a group size that divides it"
        )


def quantize(w: torch.Tensor, *, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize w `[..., K]` (float16/bfloat16/float32) exactly as CPU `mx.quantize(..., mode="affine")`.

    Returns (wq, scales, biases): wq torch.uint32 `[..., K*bits/32]`; scales and biases `[..., K/G]` in
    w's dtype. Rows are processed in chunks of about CHUNK_ELEMENTS elements; beyond the inputs and outputs
    the peak extra memory is about 20 bytes per chunk element (≈ 20 MiB), whatever the size of w.
    """
    check(bits, group_size, w.shape[-1])
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedQuantization(f"affine quantization needs a float16/bfloat16/float32 weight, not {w.dtype}")
    k = w.shape[-1]
    rows = w.reshape(-1, k)
    out = torch.empty(rows.shape[0], k * bits // 8, dtype=torch.uint8, device=w.device)
    scales = torch.empty(rows.shape[0], k // group_size, dtype=w.dtype, device=w.device)
    biases = torch.empty_like(scales)
    for r0, r1 in _row_chunks(rows.shape[0], k):
        codes, s, b = _quantize_rows(rows[r0:r1], bits, group_size)
        out[r0:r1] = _pack_bytes(codes, bits)
        scales[r0:r1] = s
        biases[r0:r1] = b
    lead = w.shape[:-1]
    return _as_words(out).reshape(*lead, -1), scales.reshape(*lead, -1), biases.reshape(*lead, -1)


def _quantize_rows(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk `[R, K]` → (codes uint8 `[R, K]`, scales and biases `[R, K/G]` in x's dtype)."""
    g = x.float().reshape(x.shape[0], -1, group_size)  # [R, K/G, G]
    hi, lo = g.amax(-1), g.amin(-1)
    n = torch.full_like(hi, 2**bits - 1)
    s0 = torch.clamp_min((hi - lo) / n, _MIN_SCALE)
    neg = lo.abs() > hi.abs()
    edge = torch.where(neg, lo, hi)
    s = torch.where(neg, s0, -s0)
    z = torch.round(edge / s)  # round-half-to-even, like rint
    fit = z != 0
    s = torch.where(fit, edge / z, s)  # re-fit so that 0.0 lands on the integer code -z
    beta = torch.where(fit, edge, torch.zeros_like(edge))
    q = torch.round((g - beta[..., None]) / s[..., None]).clamp_(0, 2**bits - 1)
    return q.to(torch.uint8).reshape(x.shape), s.to(x.dtype), beta.to(x.dtype)


def dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`scale·q + bias` for wq uint32 `[..., K*bits/32]` → `[..., K]` in dtype (default scales.dtype).

    Computed in float32 with one rounding at the end, as the GPU and quantized-matmul paths do; CPU
    `mx.dequantize` instead rounds twice in a bf16/fp16 scale dtype (formats.md §1.4). Works in row chunks
    of about CHUNK_ELEMENTS output elements; peak extra memory is about 32 bytes per chunk element.
    """
    check(bits, group_size)
    dtype = dtype or scales.dtype
    k = wq.shape[-1] * 32 // bits
    lead = wq.shape[:-1]
    words = wq.reshape(-1, wq.shape[-1])
    s, b = scales.reshape(-1, k // group_size), biases.reshape(-1, k // group_size)
    out = torch.empty(words.shape[0], k, dtype=dtype, device=wq.device)
    for r0, r1 in _row_chunks(words.shape[0], k, chunk_elements(wq.device)):
        q = unpack(words[r0:r1], bits).float().reshape(r1 - r0, -1, group_size)  # [R, K/G, G]
        w = q * s[r0:r1, :, None].float() + b[r0:r1, :, None].float()
        out[r0:r1] = w.reshape(r1 - r0, k)
    return out.reshape(*lead, k)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes `[..., K]` in [0, 2^bits) → uint32 `[..., K*bits/32]`, LSB-first bitstream per row."""
    if bits not in BITS:
        raise UnsupportedQuantization(f"affine packing supports bits in {BITS}, not {bits}")
    if codes.shape[-1] % 32:
        raise UnsupportedQuantization(f"packing needs a last dimension divisible by 32, not {codes.shape[-1]}")
    return _as_words(_pack_bytes(codes, bits))


def unpack(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 `[..., W]` → uint8 codes `[..., W*32/bits]`; the inverse of pack."""
    if bits not in BITS:
        raise UnsupportedQuantization(f"affine packing supports bits in {BITS}, not {bits}")
    units = wq.contiguous().view(torch.uint8).reshape(*wq.shape[:-1], -1, bits)  # [..., K/8, b] bytes
    stream = torch.zeros(units.shape[:-1], dtype=torch.int64, device=wq.device)
    for j in range(bits):
        stream |= units[..., j].to(torch.int64) << (8 * j)
    mask = 2**bits - 1
    codes = [(stream >> (bits * i)) & mask for i in range(8)]
    return torch.stack(codes, -1).to(torch.uint8).reshape(*wq.shape[:-1], -1)


def _pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes `[..., K]` → uint8 `[..., K*bits/8]`: each 8 codes form one b-byte little-endian unit."""
    units = codes.reshape(*codes.shape[:-1], -1, 8)  # [..., K/8, 8]
    stream = torch.zeros(units.shape[:-1], dtype=torch.int64, device=codes.device)
    for i in range(8):
        stream |= units[..., i].to(torch.int64) << (bits * i)
    out = [((stream >> (8 * j)) & 0xFF).to(torch.uint8) for j in range(bits)]
    return torch.stack(out, -1).reshape(*codes.shape[:-1], -1)


def _as_words(stream: torch.Tensor) -> torch.Tensor:
    """Bytes `[..., 4W]` → their little-endian uint32 view `[..., W]` (x86 and CUDA are little-endian)."""
    return stream.contiguous().view(torch.uint32)


def _row_chunks(n_rows: int, row_len: int, chunk: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """[r0, r1) ranges of at most max(1, chunk // row_len) rows covering n_rows."""
    step = max(1, chunk // max(row_len, 1))
    return [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]
