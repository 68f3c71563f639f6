"""PyTorch's private weight-only kernels against their dequantize-then-matmul references, and the
int8/int4 formats' round-trip error bounds, on fresh random inputs of several shapes."""

import pytest
import torch

from moekit.quant import kernels
from moekit.quant.weights import Int4Weight, Int8Weight, check_group_size, pack_nibbles, unpack_nibbles

DTYPES = [torch.float32, torch.bfloat16]
# (leading dims, N, K): odd N (int4 pads rows to 16), one row, stacked experts
SHAPES = [((), 48, 128), ((), 7, 64), ((3,), 40, 96), ((2,), 1, 256), ((4,), 33, 64)]


def _close(got, want, dtype):
    """fp32: rounding of a different summation order; bf16: a couple of ulps of the largest output."""
    got, want = got.float(), want.float()
    tol = 1e-4 if dtype == torch.float32 else 2 ** -6
    scale = want.abs().max().clamp_min(1.0)
    assert (got - want).abs().max() <= tol * scale, (got - want).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,K", SHAPES)
def test_int8_kernel_equals_reference(lead, N, K, dtype):
    g = torch.Generator().manual_seed(N * K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    scale = torch.rand(N, generator=g) * 0.02 + 1e-3
    x = torch.randn(5, K, generator=g).to(dtype)
    _close(kernels.int8_mm(x, q, scale), kernels.int8_mm_reference(x, q, scale), dtype)
    assert kernels.int8_mm(x, q, scale).dtype == dtype


@pytest.mark.skipif(not kernels.int4_available(), reason="this torch lacks the CPU int4 kernel")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("M,N,K", [(1, 16, 128), (3, 64, 256), (9, 32, 384)])
def test_int4_kernel_equals_reference(M, N, K, group, dtype):
    g = torch.Generator().manual_seed(M * N * K + group)
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    scale = torch.rand(N, K // group, generator=g) * 0.01 + 1e-3
    zero = torch.randn(N, K // group, generator=g) * 0.01
    x = torch.randn(M, K, generator=g).to(dtype)
    got = kernels.int4_mm(x, kernels.int4_pack(codes), group, scale, zero)
    _close(got, kernels.int4_mm_reference(x, codes, group, scale, zero), dtype)


@pytest.mark.skipif(not kernels.int4_available(), reason="this torch lacks the CPU int4 kernel")
@pytest.mark.parametrize("N,K", [(16, 64), (48, 256)])
def test_int4_unpack_inverts_the_private_packing(N, K):
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(N + K))
    assert torch.equal(kernels.int4_unpack(kernels.int4_pack(codes), N, K), codes)


def test_nibble_packing_round_trip():
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 5, 32) and torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | int(codes[0, 0, 1]) << 4  # even k in the low nibble


@pytest.mark.parametrize("lead,N,K", SHAPES)
def test_int8_round_trip_error_bound(lead, N, K):
    w = torch.randn(*lead, N, K, generator=torch.Generator().manual_seed(K)) * 0.05
    qw = Int8Weight.from_float(w)
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == w.shape
    err = (qw.dequantize() - w).abs()
    bound = w.abs().amax(-1, keepdim=True) / 127 / 2  # half a step of each row's scale
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()
    assert err.max() > 0  # it really is quantized


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("lead,N,K", SHAPES)
def test_int4_round_trip_error_bound(lead, N, K, group, kernel):
    if kernel and not kernels.int4_available():
        pytest.skip("this torch lacks the CPU int4 kernel")
    w = torch.randn(*lead, N, K, generator=torch.Generator().manual_seed(N + K)) * 0.05
    if K % group:
        with pytest.raises(ValueError, match=f"needs input widths divisible by it; got a weight with {K} inputs"):
            Int4Weight.from_float(w, group, kernel=kernel)
        return
    qw = Int4Weight.from_float(w, group, kernel=kernel)
    wg = w.unflatten(-1, (-1, group))
    step = (wg.amax(-1) - wg.amin(-1)) / 15  # [..., N, K/G]
    err = (qw.dequantize() - w).unflatten(-1, (-1, group)).abs()
    assert (err <= step[..., None] / 2 * (1 + 1e-4) + 1e-7).all()
    assert torch.equal(qw.codes(), unpack_nibbles(qw.export()["qweight"]))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,K", SHAPES)
def test_weight_linear_equals_its_reference_per_expert(lead, N, K, dtype, bits):
    if bits == 4 and not kernels.int4_available():
        pytest.skip("this torch lacks the CPU int4 kernel")
    g = torch.Generator().manual_seed(7 * N + K)
    w = torch.randn(*lead, N, K, generator=g) * 0.05
    qw = Int8Weight.from_float(w) if bits == 8 else Int4Weight.from_float(w, 32)
    x = torch.randn(3, K, generator=g).to(dtype)
    for e in range(lead[0]) if lead else [None]:
        got = qw.linear(x, e)
        assert got.shape == (3, N) and got.dtype == dtype
        _close(got, qw.linear_reference(x, e), dtype)
        want = x.float() @ (qw.dequantize() if e is None else qw.dequantize()[e]).t()
        _close(got, want, dtype)


@pytest.mark.parametrize("bits", [8, 4])
def test_export_round_trip_is_exact(bits):
    w = torch.randn(3, 20, 64) * 0.05
    qw = Int8Weight.from_float(w) if bits == 8 else Int4Weight.from_float(w, 32, kernel=kernels.int4_available())
    cls = type(qw)
    back = cls.from_export(qw.export(), 32, kernel=getattr(qw, "kernel", True))
    assert torch.equal(back.dequantize(), qw.dequantize())
    shapes = cls.export_shapes(tuple(w.shape), 32)
    assert {k: tuple(t.shape) for k, t in qw.export().items()} == {k: s for k, (s, _) in shapes.items()}


def test_bad_group_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="group-size must be one of 32, 64, 128, 256; got 16"):
        check_group_size(16, 64)
    with pytest.raises(ValueError, match="divisible by it; got a weight with 96 inputs"):
        check_group_size(64, 96)
