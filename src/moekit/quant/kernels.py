"""The one place that calls PyTorch's private weight-only quantized matmul ops.

Everything else in ``moekit.quant`` goes through the functions here, so a renamed or changed
private op is one place to fix. Each kernel has a plain dequantize-then-matmul reference
that the tests compare it against.

Shape legend: M rows of activations, K input features (the reduced dim), N output features,
G group size (int4). Weights are [N, K] like ``nn.Linear.weight``.

What torch 2.13 on CPU offers (found by experiment; the checks below raise if it changes):
- ``torch._weight_int8pack_mm(x [M, K], w_int8 [N, K], scales [N]) -> [M, N]`` in x's dtype;
  scales must have x's dtype; x contiguous in its last dim; any N and K.
- ``torch._convert_weight_to_int4pack_for_cpu(codes int32 [N, K] in 0..15, inner_k_tiles)``
  -> uint8 [N, K/2] in a private blocked nibble order (neither plain nor halves order); needs
  N % 16 == 0.
- ``torch._weight_int4pack_mm_for_cpu(x [M, K], packed, G, scale_zero [K/G, N, 2]) -> [M, N]``
  computes x @ ((codes - 8) * scale + zero)^T per group (tinygemm's affine form); G in
  {32, 64, 128, 256}; scale_zero in x's dtype.
- Both run fast for bf16/fp16 activations and 6-11x slower than an fp32 GEMV for fp32 ones
  (their fp32 inner loops are not vectorized: [2048, 1024] at batch 1, one thread: fp32 mm
  0.86 ms, int8 kernel 5.6 ms, int4 kernel 9.5 ms; bf16 mm 0.78 ms, int8 0.36, int4 0.24).
  The quantized layers therefore dequantize the weight and use BLAS for fp32 activations.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the CPU kernel's accepted qGroupSize values
INT4_N_MULTIPLE = 16  # the CPU int4 packing needs N % 16 == 0; other N are padded with zero rows
INT4_OFFSET = 8  # codes are stored unsigned 0..15; the kernel's affine form subtracts 8
_INNER_K_TILES = 2  # accepted values 1/2/4/8 give the same bytes on CPU; 2 is gpt-fast's default


class KernelUnavailable(RuntimeError):
    """This torch lacks (or has changed) a private quantized op moekit uses."""


def _op(name: str):
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        raise KernelUnavailable(f"this torch ({torch.__version__}) has no aten::{name}")
    return op


@functools.cache
def int4_available() -> bool:
    """True when the CPU int4 pack and matmul ops exist and give the reference's result on a
    tiny probe (a changed private op must not compute something else silently)."""
    try:
        codes = (torch.arange(32 * 32, dtype=torch.int32) % 16).view(32, 32)
        packed = int4_pack(codes)
        x = torch.linspace(-1, 1, 32)[None]
        scale, zero = torch.full((32, 1), 0.5), torch.full((32, 1), 0.25)
        got = int4_mm(x, packed, 32, scale, zero)
        want = int4_mm_reference(x, codes, 32, scale, zero)
        return bool(torch.allclose(got, want, atol=1e-4))
    except (KernelUnavailable, RuntimeError):
        return False


# --- int8, per output channel -------------------------------------------------------------


def int8_mm(x_MK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """The kernel: x @ (q * scale[:, None])^T, [M, K] x int8 [N, K] -> [M, N] in x's dtype."""
    return _op("_weight_int8pack_mm")(x_MK.contiguous(), q_NK, scale_N.to(x_MK.dtype))


def int8_mm_reference(x_MK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """Dequantize in x's dtype, then an ordinary matmul."""
    return F.linear(x_MK, q_NK.to(x_MK.dtype) * scale_N.to(x_MK.dtype)[:, None])


def linear_int8(x_MK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """What the quantized layers call: the kernel for half activations, dequantize + BLAS for
    fp32 ones (where the kernel's scalar loop is the slower of the two)."""
    if x_MK.dtype == torch.float32 or x_MK.device.type != "cpu":
        return int8_mm_reference(x_MK, q_NK, scale_N)
    return int8_mm(x_MK, q_NK, scale_N)


# --- int4, group-wise affine ---------------------------------------------------------------


def int4_pack(codes_NK: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [N, K] (any integer dtype) -> the CPU kernel's packed uint8 form. N must be
    a multiple of 16 (``pad_rows`` first)."""
    return _op("_convert_weight_to_int4pack_for_cpu")(codes_NK.to(torch.int32).contiguous(), _INNER_K_TILES)


def int4_unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The inverse of ``int4_pack``: packed -> codes uint8 [N, K].

    The packed order is private, so it is read off the op itself: packing probe matrices whose
    codes are the base-16 digits of each element's index tells where every nibble went. The
    result is checked to be a permutation, so a changed op fails loudly here."""
    src = _nibble_sources(N, K)  # [N*K]: packed nibble j holds element src[j]
    nibbles = torch.stack([packed & 15, packed >> 4], -1).reshape(-1)  # low nibble first
    codes = torch.empty(N * K, dtype=torch.uint8)
    codes[src] = nibbles
    return codes.view(N, K)


@functools.cache
def _nibble_sources(N: int, K: int) -> torch.Tensor:
    index = torch.arange(N * K, dtype=torch.int64)
    src = torch.zeros(N * K, dtype=torch.int64)
    digits = max(1, (N * K - 1).bit_length() + 3) // 4
    for d in range(digits):
        probe = ((index >> (4 * d)) & 15).view(N, K)
        p = int4_pack(probe)
        src |= torch.stack([p & 15, p >> 4], -1).reshape(-1).to(torch.int64) << (4 * d)
    if not torch.equal(torch.sort(src).values, index):
        raise KernelUnavailable("aten::_convert_weight_to_int4pack_for_cpu no longer packs by permuting nibbles")
    return src


def _scale_zero(scale_NG: torch.Tensor, zero_NG: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K/G] scales and zeros -> the kernel's [K/G, N, 2] operand in ``dtype``."""
    return torch.stack([scale_NG, zero_NG], -1).transpose(0, 1).contiguous().to(dtype)


def int4_mm(x_MK, packed, group_size: int, scale_NG, zero_NG) -> torch.Tensor:
    """The kernel: [M, K] x packed int4 [N, K] -> [M, N] in x's dtype, where the weight is
    (codes - 8) * scale + zero per group of ``group_size`` input features."""
    return int4_mm_packed(x_MK, packed, group_size, _scale_zero(scale_NG, zero_NG, x_MK.dtype))


def int4_mm_packed(x_MK, packed, group_size: int, scale_zero_GN2: torch.Tensor) -> torch.Tensor:
    """``int4_mm`` with scales and zeros already in the kernel's [K/G, N, 2] operand form."""
    return _op("_weight_int4pack_mm_for_cpu")(x_MK.contiguous(), packed, group_size, scale_zero_GN2.to(x_MK.dtype))


def int4_dequantize(codes_NK, group_size: int, scale_NG, zero_NG, dtype=torch.float32) -> torch.Tensor:
    """Codes [N, K] -> float weight [N, K]: (codes - 8) * scale + zero per group."""
    N, K = codes_NK.shape
    q = codes_NK.to(dtype).view(N, K // group_size, group_size) - INT4_OFFSET
    return (q * scale_NG.to(dtype)[..., None] + zero_NG.to(dtype)[..., None]).view(N, K)


def int4_mm_reference(x_MK, codes_NK, group_size: int, scale_NG, zero_NG) -> torch.Tensor:
    """Dequantize in x's dtype, then an ordinary matmul."""
    return F.linear(x_MK, int4_dequantize(codes_NK, group_size, scale_NG, zero_NG, x_MK.dtype))


def pad_rows(t: torch.Tensor, multiple: int = INT4_N_MULTIPLE) -> torch.Tensor:
    """Pad dim 0 with zeros to a multiple of ``multiple`` (zero scales make the rows zero)."""
    extra = -t.shape[0] % multiple
    return t if extra == 0 else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])


__all__ = [
    "INT4_GROUP_SIZES", "KernelUnavailable", "int4_available", "int8_mm", "int8_mm_reference", "linear_int8",
    "int4_pack", "int4_unpack", "int4_mm", "int4_mm_packed", "int4_mm_reference", "int4_dequantize", "pad_rows",
]
