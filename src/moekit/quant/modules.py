"""Quantized twins of the modules that hold big matrices, swapped in after loading (gpt-fast's
pattern): ``QuantizedExperts`` for ``Experts``, ``QuantizedMLP`` for ``MLP`` (dense FFNs and
shared experts), ``QuantizedLinear`` for ``nn.Linear`` (attention projections).

Each twin has its float original's call interface, so the layers around it do not change;
it holds ``Int8Weight``/``Int4Weight`` buffers instead of parameters and is inference only.

Shape legend (as in ``layers/experts.py``): T tokens, D model dim, F expert hidden width,
E experts, M dispatched slots (sorted by expert), K experts per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moekit.layers.dispatch import DispatchPlan, combine
from moekit.layers.experts import IMPLS, Experts
from moekit.layers.weights import ExpertWeights
from moekit.layers.mlp import MLP, activate
from moekit.quant.weights import Int4Weight, Int8Weight, weight_class

QuantWeight = Int8Weight | Int4Weight


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, kernel: bool = True) -> QuantWeight:
    if bits == 8:
        return Int8Weight.from_float(w)
    return weight_class(bits).from_float(w, group_size, kernel)


class QuantizedExperts(ExpertWeights):
    """The expert-weights provider (``layers/weights.py``) with int8/int4 ``w_in`` [E, H, D] and
    ``w_out`` [E, D, F]: a twin of ``Experts`` swapped in after loading.

    ``plain`` is False, so no path hands these weights to the fused float node. Compute takes
    the quantized tensors itself (``rows``, ``forward``, ``single_token``: one kernel call per
    expert that got rows, for every impl); ``get`` dequantizes the asked-for experts, for
    callers that want float matrices. ``impl="loop"`` dequantizes each expert and multiplies in
    floating point: the plain reference the kernels are tested against. Experts with biases
    (GPT-OSS) keep ``b_in`` [E, H] and ``b_out`` [E, D] in floating point under the float
    model's names, and a parametrized activation (the clamped SwiGLUs) keeps its ``act_args``:
    the twin computes the same function, only its matrices are rounded."""

    def __init__(self, w_in: QuantWeight, w_out: QuantWeight, activation: str, act_args: tuple = (),
                 b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None):
        num_experts, _, d_model = w_in.shape
        super().__init__(num_experts, d_model, w_out.shape[-1], activation)
        self.act_args = tuple(act_args)  # the clamped SwiGLUs' limit (and alpha): the expert's function, kept as is
        self.w_in, self.w_out = w_in, w_out
        self.has_bias = b_in is not None
        if self.has_bias:  # b_in [E, H], b_out [E, D]: float by design (a few values per row; GPT-OSS)
            # not copied here: an offload cache builds twins over its slot's tensors
            self.b_in = nn.Parameter(b_in.detach(), requires_grad=False)
            self.b_out = nn.Parameter(b_out.detach(), requires_grad=False)

    @classmethod
    def from_float(cls, experts: Experts, bits: int, group_size: int, kernel: bool = True) -> "QuantizedExperts":
        w_in = quantize_weight(experts.w_in, bits, group_size, kernel)
        w_out = quantize_weight(experts.w_out, bits, group_size, kernel)
        b_in, b_out = (experts.b_in.detach().clone(), experts.b_out.detach().clone()) if experts.has_bias else (None, None)
        return cls(w_in, w_out, experts.activation, experts.act_args, b_in, b_out)

    def get(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.w_in.dequantize(dtype, e), self.w_out.dequantize(dtype, e)) for e in ids]

    def biases(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.b_in[e].to(dtype), self.b_out[e].to(dtype)) for e in ids]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.scale_dtype

    def rows(self, x_MD: torch.Tensor, counts: torch.Tensor, weights_M: torch.Tensor,
             impl: str = "grouped") -> torch.Tensor:
        """Dispatched rows x_MD [M, D] (``counts`` [E]) -> y_MD [M, D] fp32 times ``weights_M``."""
        return self._rows(x_MD, counts, impl).float() * weights_M[:, None]

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, impl: str = "grouped") -> torch.Tensor:
        """x_TD [T, D] -> [T, D] fp32, as ``Experts.forward`` (the layer's local entry)."""
        y_MD = self._rows(x_TD.index_select(0, plan.token_ids), plan.counts, impl)
        return combine(y_MD, plan, x_TD.shape[0])

    def _rows(self, x_MD: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
        reference = impl == "loop"
        outs = [self._expert(e, x_e, reference) for e, x_e in enumerate(x_MD.split(counts.tolist())) if len(x_e)]
        return torch.cat(outs) if outs else x_MD.new_zeros(0, self.d_model)

    def single_token(self, x_1D: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor) -> torch.Tensor:
        """One token [1, D], its K distinct experts and weights [1, K] -> [1, D] fp32."""
        ys = [self._expert(e, x_1D).float() * w for e, w in zip(ids_1K[0].tolist(), weights_1K[0].float())]
        return torch.stack(ys).sum(0)

    def _expert(self, e: int, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """Expert e on rows [n, D] -> [n, D] in x's dtype (its biases, if any, added in float
        after each projection, as ``F.linear`` adds them)."""
        w_in, w_out = (self.w_in.linear_reference, self.w_out.linear_reference) if reference \
            else (self.w_in.linear, self.w_out.linear)
        h = w_in(x, e)  # [n, H]
        if self.has_bias:
            h = h + self.b_in[e].to(h.dtype)
        y = w_out(activate(h, self.activation, *self.act_args), e)  # [n, D]
        return y + self.b_out[e].to(y.dtype) if self.has_bias else y

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on any [.., D] input (the reference form, for tools and tests)."""
        return self._expert(e, x.reshape(-1, x.shape[-1]), reference=True).view(*x.shape[:-1], self.d_model)


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with an int8/int4 weight [N, K] (the bias, if any, stays float)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None):
        super().__init__()
        self.weight_q = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, group_size: int, kernel: bool = True) -> "QuantizedLinear":
        return cls(quantize_weight(linear.weight, bits, group_size, kernel), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [N, K], for code that reads ``.weight`` rather than calling the
        module (MLA's absorbed decode folds ``wkv_b`` into its queries): correct, not fast."""
        return self.weight_q.dequantize(self.weight_q.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_q.linear(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantizedMLP(nn.Module):
    """``MLP`` (dense FFN or shared experts) with quantized ``w_in`` and ``w_out``."""

    def __init__(self, w_in: QuantizedLinear, w_out: QuantizedLinear, activation: str, act_args: tuple = ()):
        super().__init__()
        self.activation, self.act_args = activation, tuple(act_args)  # DeepSeek-V4's shared experts clamp too
        self.w_in, self.w_out = w_in, w_out

    @classmethod
    def from_float(cls, mlp: MLP, bits: int, group_size: int, kernel: bool = True) -> "QuantizedMLP":
        return cls(QuantizedLinear.from_float(mlp.w_in, bits, group_size, kernel),
                   QuantizedLinear.from_float(mlp.w_out, bits, group_size, kernel), mlp.activation, mlp.act_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation, *self.act_args))


__all__ = ["QuantizedExperts", "QuantizedLinear", "QuantizedMLP", "quantize_weight"]
