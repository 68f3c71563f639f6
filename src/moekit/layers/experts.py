"""Routed experts: E feed-forward networks stored as stacked 3-D weights.

Shape legend: D model dim, F expert hidden width, E experts, M dispatched slots (sorted by
expert). ``w_in`` is [E, D, F_in] with F_in = 2F for SwiGLU (gate and up fused, gate first)
and F otherwise; ``w_out`` is [E, F, D]. So expert e computes act(x @ w_in[e]) @ w_out[e].

Three interchangeable ways to compute the same thing (``impl``):
- ``"grouped"``: one grouped matmul per projection over all slices, custom backward
  (``grouped_mm.py``); the training and prefill path.
- ``"decode"``: a few tokens touch a few experts: multiply only the non-empty slices against
  views of their experts' weights (no weight copies, no work for the idle experts).
- ``"loop"``: the plain per-expert loop under autograd, kept as the readable reference.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from moekit.layers.grouped_mm import grouped_ffn
from moekit.layers.mlp import activate, first_proj_width

IMPLS = ("grouped", "decode", "loop")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them oneDNN emulates bf16/fp16 GEMMs, several times slower
    than fp32 on the same CPU (docs/benchmarks.md)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _emulated_half(x: torch.Tensor) -> bool:
    """bf16/fp16 on a CPU that only emulates them: there the decode path multiplies the few rows
    and the chosen experts' weights in fp32 (3-10x faster on an AVX2 machine with cold weights;
    torch's bf16 GEMV was no faster than that, oneDNN's bf16 GEMM far slower)."""
    half = x.dtype in (torch.bfloat16, torch.float16)
    return half and x.device.type == "cpu" and not cpu_has_native_bf16()


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_expert: int, activation: str = "swiglu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, first_proj_width(d_expert, activation)))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_expert, d_model))

    def forward(self, x_MD: torch.Tensor, counts: torch.Tensor, impl: str = "grouped") -> torch.Tensor:
        """x_MD [M, D] sorted by expert, counts [E] slice lengths -> [M, D] in x's dtype.

        Each expert multiplies its contiguous slice. Each expert's weight gradient is a
        tensor (zeros when it got no tokens), never missing: data-parallel gradient
        reductions would otherwise wait for it forever (the weights are single stacked
        parameters, so this holds for every impl).
        """
        if impl == "grouped":
            return grouped_ffn(x_MD, self.w_in, self.w_out, counts, self.activation)
        if impl == "decode":
            return self._decode(x_MD, counts)
        if impl != "loop":
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
        return self._loop(x_MD, counts)

    def _decode(self, x_MD: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Only the experts that got slots run, on views of their weights: with 1-64 tokens
        the cost is reading those experts' weights once, as for a dense FFN."""
        half_on_cpu = not torch.is_autocast_enabled(x_MD.device.type) and _emulated_half(x_MD)

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            w = w.to(x_MD.dtype)  # a no-op unless fp32 master weights meet half activations
            if not half_on_cpu:
                return a @ w
            return (a.float() @ w.float()).to(x_MD.dtype)  # fp32 math rounded to half, as a GEMM gives

        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                x_e = x_MD[start : start + n]  # [n, D]; only the chosen experts' weights are read
                outs.append(mm(activate(mm(x_e, self.w_in[e]), self.activation), self.w_out[e]))
                start += n
        return torch.cat(outs).to(x_MD.dtype) if outs else x_MD.new_zeros(0, self.d_model)

    def _loop(self, x_MD: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w_in, w_out = self.w_in.to(x_MD.dtype), self.w_out.to(x_MD.dtype)
        outs = []
        for e, x_e in enumerate(torch.split(x_MD, counts.tolist())):
            outs.append(activate(x_e @ w_in[e], self.activation) @ w_out[e])  # [M_e, D]
        return torch.cat(outs) if outs else x_MD.new_zeros(0, self.d_model)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on any [.., D] input: the plain definition, used by references and tools."""
        return activate(x @ self.w_in[e].to(x.dtype), self.activation) @ self.w_out[e].to(x.dtype)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)
