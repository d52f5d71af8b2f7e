"""ossq.quant.affine against its oracle, CPU `mx.quantize` / `mx.dequantize` (mode="affine"), bit for bit."""

import numpy as np
import pytest
import torch

from ossq.errors import UnsupportedQuantization
from ossq.quant import affine
from tests.conftest import to_mx

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
K = 256  # divisible by every group size


def mx_bits(a) -> np.ndarray:
    """The raw bit patterns of an mlx array as unsigned integers."""
    mx = pytest.importorskip("mlx.core")
    return np.array(a.view({2: mx.uint16, 4: mx.uint32}[a.itemsize]))


def torch_bits(t: torch.Tensor) -> np.ndarray:
    """The raw bit patterns of a torch tensor as unsigned integers."""
    signed = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(signed).numpy().view(f"u{t.element_size()}")


def awkward_groups(bits: int, group_size: int) -> torch.Tensor:
    """float32 `[9, group_size]`: the groups where the quantizer's branches and roundings matter."""
    g, n = group_size, 2**bits - 1
    gen = torch.Generator().manual_seed(bits * 1000 + g)
    rnd = torch.randn(g, generator=gen)
    half_steps = (torch.arange(g) % min(n, 127)).float() + 0.5  # (x − n)/−1 lands on k + 0.5: rint ties
    half_steps[:2] = torch.tensor([0.0, float(n)])
    symmetric = rnd.clone()
    symmetric[:2] = torch.tensor([2.5, -2.5])
    return torch.stack(
        [
            torch.zeros(g),
            torch.full((g,), 0.7),
            torch.full((g,), -3.0),
            -rnd.abs() - 0.1,
            rnd.abs() + 0.1,
            symmetric,  # |min| == |max|: not the negative branch
            half_steps,
            rnd * 1e-9,  # z == 0: bias 0, scale unchanged
            rnd * 1e3,
        ]
    )


def weights(bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """`[~200, K]` rows of Gaussian data across six decades plus every awkward group, in dtype."""
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    scale = torch.logspace(-4, 2, 192)[:, None]
    rows = torch.randn(192, K, generator=gen) * scale
    awkward = awkward_groups(bits, group_size).repeat(1, K // group_size)
    return torch.cat([rows, awkward]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", affine.GROUP_SIZES)
@pytest.mark.parametrize("bits", affine.BITS)
def test_quantize_equals_mx_quantize_bit_for_bit(bits, group_size, dtype):
    mx = pytest.importorskip("mlx.core")
    w = weights(bits, group_size, dtype)
    wq, scales, biases = affine.quantize(w, bits=bits, group_size=group_size)
    mwq, mscales, mbiases = mx.quantize(to_mx(w), group_size=group_size, bits=bits, mode="affine")
    assert wq.dtype == torch.uint32 and scales.dtype == dtype and biases.dtype == dtype
    np.testing.assert_array_equal(affine.unpack(wq, bits).numpy(), affine.unpack(torch_u32(mwq), bits).numpy())
    np.testing.assert_array_equal(torch_bits(wq), np.array(mwq))
    np.testing.assert_array_equal(torch_bits(scales), mx_bits(mscales))
    np.testing.assert_array_equal(torch_bits(biases), mx_bits(mbiases))


def torch_u32(a) -> torch.Tensor:
    """An mlx uint32 array as a torch.uint32 tensor."""
    return torch.from_numpy(np.array(a).view(np.int32)).view(torch.uint32)


def test_tiny_groups_take_the_zero_bias_path_like_mlx():
    mx = pytest.importorskip("mlx.core")
    w = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 1e-9).bfloat16()
    wq, scales, biases = affine.quantize(w, bits=4, group_size=32)
    _, mscales, mbiases = mx.quantize(to_mx(w), group_size=32, bits=4)
    assert torch.all(biases == 0)
    np.testing.assert_array_equal(torch_bits(scales), mx_bits(mscales))
    np.testing.assert_array_equal(torch_bits(biases), mx_bits(mbiases))


def test_quantize_is_exact_across_row_chunks_and_leading_axes(monkeypatch):
    mx = pytest.importorskip("mlx.core")
    monkeypatch.setattr(affine, "CHUNK_ELEMENTS", 3 * K)  # 3 rows a chunk; 7 rows an expert
    w = torch.randn(5, 7, K, generator=torch.Generator().manual_seed(1)).bfloat16()
    wq, scales, biases = affine.quantize(w, bits=5, group_size=64)
    mwq, mscales, mbiases = mx.quantize(to_mx(w), group_size=64, bits=5)
    assert wq.shape == (5, 7, K * 5 // 32) and scales.shape == (5, 7, K // 64)
    np.testing.assert_array_equal(torch_bits(wq), np.array(mwq))
    np.testing.assert_array_equal(torch_bits(scales), mx_bits(mscales))
    np.testing.assert_array_equal(torch_bits(biases), mx_bits(mbiases))


def test_worked_example_descending_3bit_group():
    # formats.md §1.2: 7,6,…,0 repeated → hi 7, lo 0, scale −1, bias 7, codes 0..7 → bytes 88 C6 FA.
    w = (7 - torch.arange(32) % 8).float().bfloat16()[None]
    wq, scales, biases = affine.quantize(w, bits=3, group_size=32)
    assert scales.item() == -1.0 and biases.item() == 7.0
    assert wq.view(torch.uint8)[0, :3].tolist() == [0x88, 0xC6, 0xFA]


@pytest.mark.parametrize(
    ("bits", "first_bytes"),
    [
        (2, [0xE4]),  # codes 0..3
        (3, [0x88, 0xC6, 0xFA]),  # codes 0..7
        (4, [0x10, 0x32, 0x54, 0x76]),  # codes 0..7 = word 0x76543210
        (5, [0x20, 0x88, 0x41, 0x8A, 0x39]),  # codes 0..7
        (6, [0x40, 0x20, 0x0C]),  # codes 0..3
        (8, [0x00, 0x01, 0x02, 0x03]),
    ],
)
def test_pack_lays_codes_lsb_first(bits, first_bytes):
    codes = torch.arange(32) % 2**bits
    wq = affine.pack(codes[None], bits)
    assert wq.dtype == torch.uint32 and wq.shape == (1, bits)
    assert wq.view(torch.uint8)[0, : len(first_bytes)].tolist() == first_bytes
    if bits == 4:
        assert wq.view(torch.int32)[0, 0].item() == 0x76543210


@pytest.mark.parametrize("bits", affine.BITS)
def test_unpack_inverts_pack(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 128), generator=torch.Generator().manual_seed(bits))
    wq = affine.pack(codes, bits)
    assert wq.shape == (3, 5, 128 * bits // 32)
    assert torch.equal(affine.unpack(wq, bits), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", affine.BITS)
def test_unpack_reads_the_codes_mlx_reads(bits):
    mx = pytest.importorskip("mlx.core")
    words = torch.randint(-(2**31), 2**31, (4, 3 * bits), dtype=torch.int64).to(torch.int32)
    wq = words.view(torch.uint32)
    ones = mx.ones((4, 3), dtype=mx.float32)  # 96 codes a row: three groups of 32
    codes = mx.dequantize(to_mx(wq), ones, mx.zeros_like(ones), group_size=32, bits=bits)  # scale 1, bias 0
    assert torch.equal(affine.unpack(wq, bits), torch.from_numpy(np.array(codes)).to(torch.uint8))


def test_dequantize_equals_mx_dequantize_in_float32():
    mx = pytest.importorskip("mlx.core")
    w = torch.randn(64, K, generator=torch.Generator().manual_seed(2))
    for bits in affine.BITS:
        wq, scales, biases = affine.quantize(w, bits=bits, group_size=64)
        ours = affine.dequantize(wq, scales, biases, bits=bits, group_size=64)
        theirs = mx.dequantize(to_mx(wq), to_mx(scales), to_mx(biases), group_size=64, bits=bits)
        assert ours.dtype == torch.float32
        np.testing.assert_array_equal(torch_bits(ours), mx_bits(theirs))


def test_dequantize_of_bf16_scales_computes_in_float32():
    # mx.dequantize rounds q·s to bf16 before adding the bias (formats.md §1.4); we compute in float32 as the
    # matmul kernels do, which equals mx.dequantize fed the same scales and biases widened to float32.
    mx = pytest.importorskip("mlx.core")
    w = torch.randn(64, K, generator=torch.Generator().manual_seed(3)).bfloat16()
    wq, scales, biases = affine.quantize(w, bits=3, group_size=32)
    ours = affine.dequantize(wq, scales, biases, bits=3, group_size=32, dtype=torch.float32)
    theirs = mx.dequantize(to_mx(wq), to_mx(scales.float()), to_mx(biases.float()), group_size=32, bits=3)
    np.testing.assert_array_equal(torch_bits(ours), mx_bits(theirs))
    rounded = affine.dequantize(wq, scales, biases, bits=3, group_size=32)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, ours.bfloat16())


def test_quantized_weights_round_trip_through_safetensors_into_mlx(tmp_path):
    mx = pytest.importorskip("mlx.core")
    from safetensors.torch import save_file

    w = torch.randn(8, K, generator=torch.Generator().manual_seed(4)).bfloat16()
    wq, scales, biases = affine.quantize(w, bits=6, group_size=128)
    save_file({"weight": wq, "scales": scales, "biases": biases}, tmp_path / "q.safetensors")
    loaded = mx.load(str(tmp_path / "q.safetensors"))
    assert loaded["weight"].dtype == mx.uint32 and loaded["scales"].dtype == mx.bfloat16
    mwq, mscales, mbiases = mx.quantize(to_mx(w), group_size=128, bits=6)
    assert mx.array_equal(loaded["weight"], mwq) and mx.array_equal(loaded["scales"], mscales)
    assert mx.array_equal(loaded["biases"], mbiases)


@pytest.mark.parametrize(
    ("bits", "group_size", "in_features", "named"),
    [(7, 64, None, "7"), (4, 16, None, "16"), (4, 128, 2880, "2880"), (1, 64, None, "1")],
)
def test_check_rejects_what_mlx_cannot_store(bits, group_size, in_features, named):
    with pytest.raises(UnsupportedQuantization, match=named):
        affine.check(bits, group_size, in_features)


def test_check_accepts_gpt_oss_shapes():
    affine.check(4, 64, 2880)
    affine.check(8, 32, 2880)
    affine.check(2, 128, 4096)


def test_quantize_rejects_a_row_that_does_not_split_into_groups():
    with pytest.raises(UnsupportedQuantization, match="2880"):
        affine.quantize(torch.zeros(2, 2880), bits=4, group_size=128)
