"""Routed experts with per-expert LoRA and expert dropout: an expert-weights provider
(``layers/weights.py``) that replaces ``Experts`` from outside, as ``QuantizedExperts`` does.

Shape legend: D model dim, F expert hidden width, H first-projection width (2F for SwiGLU),
E experts, r LoRA rank, M dispatched rows (grouped by expert), K experts per token.

Each expert e keeps its frozen matrices and gets its own low-rank pair per matrix (Hu et al.
2021, applied per expert):
    w_in[e]  [H, D]  + s * w_in_lora_B[e]  [H, r] @ w_in_lora_A[e]  [r, D]
    w_out[e] [D, F]  + s * w_out_lora_B[e] [D, r] @ w_out_lora_A[e] [r, F]      s = alpha / r
The low-rank term is computed on the rows routed to each expert only, factored
(``(x @ A^T) @ B^T``: 2r(D + H) flops per row, no [H, D] delta matrix), in both the grouped
path (training, prefill) and the single-token decode path. PEFT's ``target_parameters``
instead materializes W + BA for every expert on every forward.

Expert dropout (Switch Transformer, Fedus et al. 2021, sec. 2.3: dropout 0.4 on the experts'
hidden activations while fine-tuning, 0.1 elsewhere) runs on act(h) [m, F], in training only.

``impl="loop"`` is the plain reference: each expert with the merged matrix W + s * B A.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.dispatch import DispatchPlan, combine
from moekit.layers.experts import IMPLS, Experts
from moekit.layers.mlp import activate
from moekit.layers.weights import ExpertWeights

LORA_MATRICES = ("w_in", "w_out")


class LoRAExperts(ExpertWeights):
    """``Experts``' frozen ``w_in`` [E, H, D] and ``w_out`` [E, D, F] (the same parameters, so
    the state-dict names stay; with them GPT-OSS's ``b_in`` [E, H] and ``b_out`` [E, D], not
    adapted, and the clamped SwiGLUs' ``act_args``), plus, when ``rank`` > 0, ``w_in_lora_A`` [E, r, D],
    ``w_in_lora_B`` [E, H, r], ``w_out_lora_A`` [E, r, F], ``w_out_lora_B`` [E, D, r]."""

    def __init__(self, base: Experts, rank: int = 0, alpha: float = 16.0, lora_dropout: float = 0.0,
                 expert_dropout: float = 0.0):
        super().__init__(base.num_experts, base.d_model, base.d_expert, base.activation)
        self.first_expert = base.first_expert
        self.w_in, self.w_out = base.w_in, base.w_out
        self.has_bias, self.act_args = base.has_bias, base.act_args
        if self.has_bias:
            self.b_in, self.b_out = base.b_in, base.b_out
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank if rank else 0.0
        self.lora_dropout, self.expert_dropout = lora_dropout, expert_dropout
        for name in LORA_MATRICES if rank else ():
            out_dim, in_dim = getattr(self, name).shape[1:]
            w = getattr(self, name)
            a = nn.Parameter(torch.empty(self.num_experts, rank, in_dim, dtype=w.dtype, device=w.device))
            b = nn.Parameter(torch.zeros(self.num_experts, out_dim, rank, dtype=w.dtype, device=w.device))
            for e in range(self.num_experts):  # PEFT's default: A as nn.Linear's init, B = 0 (starts at W)
                nn.init.kaiming_uniform_(a.data[e], a=math.sqrt(5))
            setattr(self, f"{name}_lora_A", a)
            setattr(self, f"{name}_lora_B", b)

    # -- the provider interface ---------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    def get(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The merged matrices W + s * B A of the listed experts (for tools and the reference)."""
        return [(self.merged("w_in", e).to(dtype), self.merged("w_out", e).to(dtype)) for e in ids]

    def biases(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.b_in[e].to(dtype), self.b_out[e].to(dtype)) for e in ids]

    def merged(self, name: str, e: int) -> torch.Tensor:
        """Expert e's ``name`` matrix with its adapter folded in, in the weights' dtype."""
        w = getattr(self, name)[e]
        if not self.rank:
            return w
        a, b = getattr(self, f"{name}_lora_A")[e], getattr(self, f"{name}_lora_B")[e]
        return (w.float() + self.scale * (b.float() @ a.float())).to(w.dtype)

    def rows(self, x_MD: torch.Tensor, counts: torch.Tensor, weights_M: torch.Tensor,
             impl: str = "grouped") -> torch.Tensor:
        """Dispatched rows x_MD [M, D] (``counts`` [E]) -> y_MD [M, D] fp32 times ``weights_M``."""
        return self._rows(x_MD, counts, impl).float() * weights_M[:, None]

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, impl: str = "grouped") -> torch.Tensor:
        """x_TD [T, D] -> [T, D] fp32 (the layer's local entry; combine applies the weights)."""
        y_MD = self._rows(x_TD.index_select(0, plan.token_ids), plan.counts, impl)
        return combine(y_MD, plan, x_TD.shape[0])

    def single_token(self, x_1D: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor) -> torch.Tensor:
        """One token [1, D], its K distinct experts and weights [1, K] -> [1, D] fp32: only the
        K routed experts' matrices and adapters are read."""
        ys = [self._expert(e, x_1D).float() * w for e, w in zip(ids_1K[0].tolist(), weights_1K[0].float())]
        return torch.stack(ys).sum(0)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on any [.., D] input, with its adapter (the reference form, for tools)."""
        return self._expert(e, x.reshape(-1, x.shape[-1]), reference=True).view(*x.shape[:-1], self.d_model)

    # -- compute ---------------------------------------------------------------------------
    def _rows(self, x_MD: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
        """Rows grouped by expert [M, D] -> each row's expert output [M, D] in x's dtype.
        Experts without rows cost nothing; every adapter still gets a gradient tensor (zeros
        where no row went), as data-parallel reductions need."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
        reference = impl == "loop"
        outs = [self._expert(e, x_e, reference) for e, x_e in enumerate(x_MD.split(counts.tolist())) if len(x_e)]
        if outs:
            return torch.cat(outs)
        untouched = sum(p.sum() for p in self._adapters()) * 0  # in the graph: gradients of zeros
        return x_MD.new_zeros(0, self.d_model) + untouched

    def _expert(self, e: int, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """Expert e on rows [m, D] -> [m, D] in x's dtype. The reference multiplies by the
        merged matrices; otherwise the low-rank term is a separate, factored product."""
        dtype = x.dtype
        b_in, b_out = self.biases([e], dtype)[0] if self.has_bias else (None, None)
        if reference:
            h = F.linear(x, self.merged("w_in", e).to(dtype), b_in)
            return F.linear(self._drop_hidden(self._act(h)), self.merged("w_out", e).to(dtype), b_out)
        h = F.linear(x, self.w_in[e].to(dtype), b_in) + self._low_rank("w_in", e, x)  # [m, H]
        a = self._drop_hidden(self._act(h))  # [m, F]
        return F.linear(a, self.w_out[e].to(dtype), b_out) + self._low_rank("w_out", e, a)  # [m, D]

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        return activate(h, self.activation, *self.act_args)

    def _low_rank(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor | float:
        """s * B_e (A_e x) for rows x [m, in] -> [m, out] (0 without adapters)."""
        if not self.rank:
            return 0.0
        a, b = getattr(self, f"{name}_lora_A")[e], getattr(self, f"{name}_lora_B")[e]
        x = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.scale  # [m, r] -> [m, out]

    def _drop_hidden(self, a: torch.Tensor) -> torch.Tensor:
        return F.dropout(a, self.expert_dropout, self.training) if self.expert_dropout else a

    def _adapters(self) -> list[nn.Parameter]:
        return [getattr(self, f"{n}_lora_{ab}") for n in LORA_MATRICES for ab in "AB"] if self.rank else []

    # -- back to plain experts ---------------------------------------------------------------
    @torch.no_grad()
    def to_plain(self) -> Experts:
        """An ``Experts`` holding W + s * B A (``merge``): the same outputs, no adapter."""
        plain = Experts(self.num_experts, self.d_model, self.d_expert, self.activation, self.has_bias, self.act_args)
        plain.first_expert = self.first_expert
        if self.has_bias:  # not adapted: the same parameters
            plain.b_in, plain.b_out = self.b_in, self.b_out
        for name in LORA_MATRICES:
            merged = torch.stack([self.merged(name, e) for e in range(self.num_experts)])
            setattr(plain, name, nn.Parameter(merged, requires_grad=getattr(self, name).requires_grad))
        return plain

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, rank={self.rank}, alpha={self.alpha}, "
                f"lora_dropout={self.lora_dropout}, expert_dropout={self.expert_dropout}")


__all__ = ["LoRAExperts", "LORA_MATRICES"]
