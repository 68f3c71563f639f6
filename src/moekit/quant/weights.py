"""Quantized weight containers: int8 per output channel and int4 group-wise affine.

Shape legend: N output features, K input features, G group size (int4), ``...`` leading
dims (E experts for stacked expert weights, none for a Linear). A float weight [..., N, K]
(``nn.Linear.weight`` layout, or ``Experts.w_in``/``w_out`` stacked over experts) becomes a
small module whose ``linear(x, e)`` multiplies activations [M, K] by slice ``e`` (or the
whole 2-D weight) through ``kernels.py``.

Formats (the published weight-only schemes, as in gpt-fast and torchao):
- int8: q = round(w / s), s = max|w_row| / 127 per output row (symmetric, no zero point);
  |w - q s| <= s / 2.
- int4: per group of G input features, s = (max - min) / 15 and codes c = round((w - min) / s)
  in 0..15; w ~ (c - 8) s + z with z = min + 8 s (tinygemm's form, which the CPU kernel
  takes); |w - dequant| <= s / 2.

``export()`` gives the portable on-disk tensors (int8 ``qweight`` + ``scale``; int4 nibbles
two per byte, even k in the low nibble, + ``scale`` + ``zero``), independent of the kernel's
private packing; ``from_export`` rebuilds the in-memory form. Scales are float buffers, so
``model.to(bf16)`` carries them along like any weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import ConfigError
from moekit.quant import kernels

BITS = (8, 4)
INT8_MAX = 127


def _per_matrix(w: torch.Tensor, fn) -> torch.Tensor:
    """Apply fn to each [N, K] matrix of [..., N, K] and stack back."""
    mats = w.reshape(-1, *w.shape[-2:])
    return torch.stack([fn(m) for m in mats]).reshape(*w.shape[:-2], *fn(mats[0]).shape) if len(mats) else w


class Int8Weight(nn.Module):
    bits = 8

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if qweight.dtype != torch.int8 or scale.shape != qweight.shape[:-1]:
            raise ValueError(f"int8 weight wants int8 [..., N, K] and scale [..., N]; got {qweight.dtype} "
                             f"{list(qweight.shape)} and {list(scale.shape)}")
        self.register_buffer("qweight", qweight)  # [..., N, K] int8
        self.register_buffer("scale", scale)  # [..., N] float

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor) -> "Int8Weight":
        w = w.detach().float()
        scale = (w.abs().amax(-1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)  # [..., N]
        q = torch.round(w / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return cls(q, scale)

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scale.dtype

    def linear(self, x_MK: torch.Tensor, e: int | None = None) -> torch.Tensor:
        q, s = (self.qweight, self.scale) if e is None else (self.qweight[e], self.scale[e])
        return kernels.linear_int8(x_MK, q, s)

    def linear_reference(self, x_MK: torch.Tensor, e: int | None = None) -> torch.Tensor:
        q, s = (self.qweight, self.scale) if e is None else (self.qweight[e], self.scale[e])
        return kernels.int8_mm_reference(x_MK, q, s)

    def dequantize(self, dtype: torch.dtype = torch.float32, e: int | None = None) -> torch.Tensor:
        """The float weight [..., N, K] (or matrix ``e`` of a stack)."""
        q, s = (self.qweight, self.scale) if e is None else (self.qweight[e], self.scale[e])
        return q.to(dtype) * s.to(dtype)[..., None]

    def export(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scale": self.scale}

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor], group_size: int | None = None, kernel: bool = True) -> "Int8Weight":
        return cls(t["qweight"], t["scale"])

    @staticmethod
    def export_shapes(shape: tuple[int, ...], group_size: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        """The on-disk tensors for a float weight of ``shape``: name -> (shape, dtype kind)."""
        return {"qweight": (tuple(shape), "int8"), "scale": (tuple(shape[:-1]), "float")}


class Int4Weight(nn.Module):
    """int4 codes with per-group scale and zero. In kernel form ``packed`` holds the CPU
    kernel's private layout (rows padded to a multiple of 16); in reference form (``kernel=False``,
    for a torch without the op) it holds the portable nibbles and compute dequantizes."""

    bits = 4

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, n: int, k: int, group_size: int, kernel: bool):
        super().__init__()
        self.n, self.k, self.group_size, self.kernel = n, k, group_size, kernel
        self.register_buffer("packed", packed)  # [..., N or Np, K/2] uint8
        self.register_buffer("scale_zero", scale_zero)  # [..., K/G, Np, 2] float: the kernel's operand

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor, group_size: int = 64, kernel: bool = True) -> "Int4Weight":
        check_group_size(group_size, w.shape[-1])
        w = w.detach().float()
        g = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)  # [..., N, K/G, G]
        lo, hi = g.amin(-1), g.amax(-1)  # [..., N, K/G]
        scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(w.shape)
        return cls.from_codes(codes, scale, lo + kernels.INT4_OFFSET * scale, group_size, kernel)

    @classmethod
    def from_codes(cls, codes, scale, zero, group_size: int, kernel: bool) -> "Int4Weight":
        """codes uint8 [..., N, K] in 0..15, scale and zero [..., N, K/G] -> the in-memory form."""
        n, k = codes.shape[-2:]
        sz = torch.stack([scale, zero], -1)  # [..., N, K/G, 2]
        sz = F.pad(sz, (0, 0, 0, 0, 0, -n % kernels.INT4_N_MULTIPLE)).transpose(-3, -2).contiguous()  # [..., K/G, Np, 2]
        if kernel:
            packed = _per_matrix(codes, lambda m: kernels.int4_pack(kernels.pad_rows(m)))
        else:
            packed = pack_nibbles(codes)
        return cls(packed, sz, n, k, group_size, kernel)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-2], self.n, self.k))

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scale_zero.dtype

    def codes(self) -> torch.Tensor:
        """uint8 [..., N, K] in 0..15."""
        if not self.kernel:
            return unpack_nibbles(self.packed)
        np_ = self.packed.shape[-2]
        return _per_matrix(self.packed, lambda m: kernels.int4_unpack(m, np_, self.k)[: self.n])

    def _scale_zero(self, e: int | None):
        sz = self.scale_zero if e is None else self.scale_zero[e]  # [K/G, Np, 2]
        return sz[..., : self.n, 0].transpose(-1, -2), sz[..., : self.n, 1].transpose(-1, -2)  # [N, K/G] each

    def linear(self, x_MK: torch.Tensor, e: int | None = None) -> torch.Tensor:
        # fp32 activations: dequantize and use BLAS, as int8 does; the kernel's fp32 loop is
        # scalar (10x an fp32 GEMV at batch 1, worse on prefill; kernels.py's docstring)
        if not self.kernel or x_MK.dtype == torch.float32:
            return self.linear_reference(x_MK, e)
        if x_MK.device.type != "cpu":
            raise RuntimeError("int4 weights in the CPU kernel's packing compute on CPU only")
        packed, sz = (self.packed, self.scale_zero) if e is None else (self.packed[e], self.scale_zero[e])
        y = kernels.int4_mm_packed(x_MK, packed, self.group_size, sz)  # [M, Np]
        return y if y.shape[1] == self.n else y[:, : self.n]

    def linear_reference(self, x_MK: torch.Tensor, e: int | None = None) -> torch.Tensor:
        codes = self.codes() if e is None else self._codes_of(e)
        scale, zero = self._scale_zero(e)
        return kernels.int4_mm_reference(x_MK, codes, self.group_size, scale, zero)

    def _codes_of(self, e: int) -> torch.Tensor:
        if not self.kernel:
            return unpack_nibbles(self.packed[e])
        return kernels.int4_unpack(self.packed[e], self.packed.shape[-2], self.k)[: self.n]

    def dequantize(self, dtype: torch.dtype = torch.float32, e: int | None = None) -> torch.Tensor:
        """The float weight [..., N, K] (or matrix ``e`` of a stack)."""
        scale, zero = self._scale_zero(e)  # [..., N, K/G]
        codes = self.codes() if e is None else self._codes_of(e)
        q = codes.to(dtype).unflatten(-1, (-1, self.group_size)) - kernels.INT4_OFFSET  # [..., N, K/G, G]
        return (q * scale.to(dtype)[..., None] + zero.to(dtype)[..., None]).flatten(-2)

    def export(self) -> dict[str, torch.Tensor]:
        scale, zero = self._scale_zero(None)
        return {"qweight": pack_nibbles(self.codes()), "scale": scale.contiguous(), "zero": zero.contiguous()}

    @classmethod
    def from_export(cls, t: dict[str, torch.Tensor], group_size: int | None = None, kernel: bool = True) -> "Int4Weight":
        return cls.from_codes(unpack_nibbles(t["qweight"]), t["scale"], t["zero"], group_size, kernel)

    @staticmethod
    def export_shapes(shape: tuple[int, ...], group_size: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        *lead, n, k = shape
        groups = (*lead, n, k // group_size)
        return {"qweight": ((*lead, n, k // 2), "uint8"), "scale": (groups, "float"), "zero": (groups, "float")}


def check_group_size(group_size: int, k: int) -> None:
    if group_size not in kernels.INT4_GROUP_SIZES:
        raise ConfigError(f"--group-size must be one of {', '.join(map(str, kernels.INT4_GROUP_SIZES))}; got {group_size}")
    if k % group_size:
        raise ConfigError(f"int4 with group size {group_size} needs input widths divisible by it; got a weight with {k} inputs")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] in 0..15 (K even) -> [..., K/2], even k in the low nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


def weight_class(bits: int):
    if bits not in BITS:
        raise ConfigError(f"--bits must be 8 or 4; got {bits}")
    return Int8Weight if bits == 8 else Int4Weight


__all__ = ["Int8Weight", "Int4Weight", "BITS", "check_group_size", "pack_nibbles", "unpack_nibbles", "weight_class"]
