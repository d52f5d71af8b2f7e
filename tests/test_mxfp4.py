"""ossq.quant.mxfp4 against transformers' MXFP4 decoder and mlx's mxfp4 quantize/dequantize, bit for bit."""

import numpy as np
import pytest
import torch

from ossq.errors import UnsupportedQuantization
from ossq.quant import mxfp4
from tests.conftest import to_mx


def bits_of(values) -> np.ndarray:
    """Raw bit patterns of a float torch tensor or mlx array, as unsigned integers (NaN-safe to compare)."""
    if isinstance(values, torch.Tensor):
        signed = {2: torch.int16, 4: torch.int32}[values.element_size()]
        return values.contiguous().view(signed).numpy().view(f"u{values.element_size()}")
    mx = pytest.importorskip("mlx.core")
    return np.array(values.view({2: mx.uint16, 4: mx.uint32}[values.itemsize]))


def random_blocks(shape: tuple[int, ...], scale_range: tuple[int, int], seed: int):
    """HF-layout uint8 blocks `[*shape, 16]` and E8M0 scales `[*shape]` drawn from scale_range (inclusive)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(scale_range[0], scale_range[1] + 1, shape, dtype=torch.uint8, generator=gen)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("scale_range", [(110, 135), (0, 254)], ids=["gpt-oss", "all-finite"])
def test_decode_blocks_equals_transformers_convert_moe_packed_tensors(dtype, scale_range):
    hf_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    blocks, scales = random_blocks((3, 40, 12), scale_range, seed=0)  # [E, R, nb]
    theirs = hf_mxfp4.convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)  # [E, K, R]
    ours = mxfp4.decode_blocks(blocks, scales, dtype=dtype)  # [E, R, K]
    assert ours.shape == (3, 40, 12 * 32) and ours.dtype == dtype
    np.testing.assert_array_equal(bits_of(ours.transpose(1, 2)), bits_of(theirs))


def test_decode_blocks_follows_the_element_order_of_the_spec():
    # byte 0x21 holds element 0 = code 1 (+0.5) in its low nibble and element 1 = code 2 (+1.0) in its high.
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0], blocks[0, 15] = 0x21, 0xF8  # last byte: element 30 = −0.0, element 31 = −6
    values = mxfp4.decode_blocks(blocks, torch.tensor([129], dtype=torch.uint8), dtype=torch.float32)
    assert values[:2].tolist() == [2.0, 4.0] and values[30:].tolist() == [-0.0, -24.0]
    assert torch.signbit(values[30]) and values[2:30].abs().sum() == 0


@pytest.mark.parametrize(
    ("dtype", "scale_range"),
    [(torch.bfloat16, (0, 255)), (torch.float32, (0, 255)), (torch.float16, (103, 142))],
    ids=["bf16", "fp32", "fp16-representable"],
)
def test_decode_equals_mx_dequantize(dtype, scale_range):
    mx = pytest.importorskip("mlx.core")
    blocks, scales = random_blocks((6, 64, 9), scale_range, seed=1)
    weight = mxfp4.blocks_to_mlx(blocks)  # [6, 64, 36]
    mx_dtype = {torch.bfloat16: mx.bfloat16, torch.float32: mx.float32, torch.float16: mx.float16}[dtype]
    theirs = mx.dequantize(to_mx(weight), to_mx(scales), mode="mxfp4", group_size=32, bits=4, dtype=mx_dtype)
    ours = mxfp4.decode(weight, scales, dtype=dtype)
    assert ours.shape == (6, 64, 9 * 32) and ours.dtype == dtype
    # Scale 255 is +inf, so code 0 or 8 there gives NaN, whose payload bits are not part of the contract.
    nan = np.isnan(np.array(theirs.astype(mx.float32)))
    assert np.array_equal(torch.isnan(ours).numpy(), nan)
    np.testing.assert_array_equal(bits_of(ours)[~nan], bits_of(theirs)[~nan])


def test_decode_defaults_to_bfloat16_like_mlx():
    mx = pytest.importorskip("mlx.core")
    blocks, scales = random_blocks((4, 2), (120, 130), seed=2)
    weight = mxfp4.blocks_to_mlx(blocks)
    theirs = mx.dequantize(to_mx(weight), to_mx(scales), mode="mxfp4", group_size=32, bits=4)
    assert theirs.dtype == mx.bfloat16 and mxfp4.decode(weight, scales).dtype == torch.bfloat16


def test_mlx_view_keeps_the_bytes_and_inverts():
    mx = pytest.importorskip("mlx.core")
    blocks, _ = random_blocks((2, 5, 3), (127, 127), seed=3)
    weight = mxfp4.blocks_to_mlx(blocks)
    assert weight.dtype == torch.uint32 and weight.shape == (2, 5, 12)
    assert weight.numpy().tobytes() == blocks.numpy().tobytes()
    # mlx-lm's gpt_oss sanitize makes the same words with mlx's own view.
    theirs = mx.array(blocks.numpy()).view(mx.uint32).reshape(2, 5, 12)
    np.testing.assert_array_equal(weight.view(torch.int32).numpy().view(np.uint32), np.array(theirs))
    assert torch.equal(mxfp4.mlx_to_blocks(weight), blocks)


def test_encode_blocks_reproduces_values_already_on_the_grid():
    blocks, scales = random_blocks((50, 8), (110, 135), seed=4)
    values = mxfp4.decode_blocks(blocks, scales, dtype=torch.float32)
    again = mxfp4.decode_blocks(*mxfp4.encode_blocks(values), dtype=torch.float32)
    np.testing.assert_array_equal(bits_of(again), bits_of(values))  # −0.0 included


def test_encode_blocks_of_gaussian_data_is_close():
    w = torch.randn(64, 2880, generator=torch.Generator().manual_seed(5))
    blocks, scales = mxfp4.encode_blocks(w)
    assert blocks.shape == (64, 90, 16) and scales.shape == (64, 90) and blocks.dtype == torch.uint8
    back = mxfp4.decode_blocks(blocks, scales, dtype=torch.float32)
    assert (back - w).norm() / w.norm() < 0.2


def test_encode_blocks_rounds_ties_to_even_and_saturates():
    # amax 4 gives exponent 0, so these values are already in E2M1 units.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 4.0]
    expect = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 4.0]
    w = torch.tensor(ties + [0.0] * 23)
    blocks, scales = mxfp4.encode_blocks(w[None])
    assert scales.item() == 127
    assert mxfp4.decode_blocks(blocks, scales, dtype=torch.float32)[0, :9].tolist() == expect
    w = torch.tensor([7.9, -7.0, 1.0] + [0.0] * 29)  # amax in [4, 8): exponent 0, ±6 saturate
    back = mxfp4.decode_blocks(*mxfp4.encode_blocks(w[None]), dtype=torch.float32)
    assert back[0, :3].tolist() == [6.0, -6.0, 1.0]


def test_encode_blocks_of_a_zero_block_is_zero_with_a_unit_scale():
    blocks, scales = mxfp4.encode_blocks(torch.zeros(2, 64))
    assert torch.all(scales == 127) and torch.all(blocks == 0)


def mx_quantize_mxfp4(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    mx = pytest.importorskip("mlx.core")
    version = tuple(int(p) for p in mx.__version__.split(".")[:3])
    if version < (0, 32, 4):
        pytest.skip(f"mxfp4 quantize rule verified against mlx 0.32.4 (round-up scale); found {mx.__version__}")
    wq, scales = mx.quantize(to_mx(w), group_size=32, bits=4, mode="mxfp4")
    return np.array(wq), np.array(scales)


def assert_quantize_matches_mlx(w: torch.Tensor) -> None:
    wq, scales = mxfp4.quantize(w)
    mwq, mscales = mx_quantize_mxfp4(w)
    assert wq.dtype == torch.uint32 and scales.dtype == torch.uint8
    np.testing.assert_array_equal(scales.numpy(), mscales)
    np.testing.assert_array_equal(wq.view(torch.int32).numpy().view(np.uint32), mwq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_quantize_equals_mx_quantize_mxfp4(dtype):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(300, 256, generator=gen) * torch.logspace(-3, 3, 300)[:, None]
    w[0] = 0.0
    w[1] = -0.0
    w[2] = torch.tensor([2.5, -2.5, 5.0, -5.0, 0.25, -0.25, 0.75, 1.25, 1.75, 3.5, -0.1, 6.0] * 21 + [0.0] * 4)
    w[3] = w[2] * 2**-9  # the same ties at another scale
    assert_quantize_matches_mlx(w.to(dtype).reshape(3, 100, 256))


@pytest.mark.parametrize(("dtype", "end"), [(torch.bfloat16, 0x7F80), (torch.float16, 0x7C00)], ids=str)
def test_quantize_equals_mx_quantize_mxfp4_for_every_block_maximum(dtype, end):
    # One block per positive finite value of the dtype as its max |x|: every scale decision mlx can make.
    amax = torch.arange(1, end, dtype=torch.int32).to(torch.int16).view(dtype)
    frac = torch.rand(amax.shape[0], 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    w = (amax.float()[:, None] * frac).to(dtype)
    w[:, 0] = amax
    assert_quantize_matches_mlx(w)


def test_quantize_is_exact_across_chunks(monkeypatch):
    monkeypatch.setattr(mxfp4, "CHUNK_ELEMENTS", 16 * 32 * 3)  # 3 blocks a chunk
    w = torch.randn(7, 96, generator=torch.Generator().manual_seed(8)).bfloat16()
    assert_quantize_matches_mlx(w)


def test_mxfp4_rejects_rows_that_do_not_split_into_blocks():
    with pytest.raises(UnsupportedQuantization, match="48"):
        mxfp4.quantize(torch.zeros(2, 48))
    with pytest.raises(UnsupportedQuantization, match="48"):
        mxfp4.encode_blocks(torch.zeros(2, 48))
    with pytest.raises(UnsupportedQuantization, match="16"):
        mxfp4.decode_blocks(torch.zeros(2, 3, 8, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
