"""The offloaded expert-weights provider: a twin of ``Experts`` / ``QuantizedExperts`` whose
weights come one expert at a time from a ``LayerCache`` (``cache.py``).

Shape legend (as in ``layers/experts.py``): T tokens, D model dim, F expert hidden width,
H first-projection width, E experts, K experts per token, M dispatched rows.

Bit-identical to the in-memory provider by construction: every entry runs the in-memory
code on one-expert views (``ResidentExperts`` over a cache slot, or a one-expert
``QuantizedExperts``) and puts the pieces together the way the in-memory code does:
- ``single_token``: each expert's [1, D] output (the in-memory function on one expert), then
  the same stack-and-sum over K.
- ``rows`` / ``forward`` (decode, loop, quantized): each expert's rows through the in-memory
  row function, concatenated; the row functions work row by row (per-expert matmuls, the
  activation per row), so a row does not depend on which other experts share the call.
- ``forward`` with the grouped impl on float weights (prefill): the fused node per expert,
  summed into the output in expert order; the fused node adds each block's rows into zeros
  in slot order, which is the same sequence of additions.
Only one expert is pinned at a time, so the cache needs a single slot to work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from moekit.layers.dispatch import DispatchPlan, LocalDispatcher, combine
from moekit.layers.experts import IMPLS, Experts, expert_rows
from moekit.layers.experts import single_token as float_single_token
from moekit.layers.grouped_mm import grouped_moe
from moekit.layers.weights import ExpertWeights
from moekit.offload.cache import LayerCache
from moekit.quant.modules import QuantizedExperts
from moekit.quant.weights import Int4Weight, Int8Weight

_LOCAL = LocalDispatcher()


class _Scratch:
    """The streaming GEMV's product buffer (``experts._gemv_for``), shared by a layer's views
    so that each cache slot does not grow one of its own."""

    t: torch.Tensor | None = None


class ResidentExperts(ExpertWeights):
    """Float experts over tensors someone else owns (a cache slot): ``w_in`` [E, H, D],
    ``w_out`` [E, D, F] and, with biases (GPT-OSS), ``b_in`` [E, H] and ``b_out`` [E, D], here
    with E = 1. Computes exactly as ``Experts``."""

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, activation: str, scratch: _Scratch,
                 act_args: tuple = (), b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None):
        super().__init__(w_in.shape[0], w_in.shape[-1], w_out.shape[-1], activation)
        self.w_in, self.w_out, self._scratch = w_in, w_out, scratch
        self.act_args, self.has_bias = tuple(act_args), b_in is not None
        self.b_in, self.b_out = b_in, b_out

    @property
    def _gemv_scratch(self) -> torch.Tensor | None:
        return self._scratch.t

    @_gemv_scratch.setter
    def _gemv_scratch(self, t: torch.Tensor) -> None:
        self._scratch.t = t

    get = Experts.get
    stacked = Experts.stacked
    biases = Experts.biases
    stacked_biases = Experts.stacked_biases
    dtype = Experts.dtype
    expert_forward = Experts.expert_forward

    def rows(self, x_MD, counts, weights_M, impl="grouped"):
        return expert_rows(self, x_MD, counts, weights_M, impl)

    def single_token(self, x_1D, ids_1K, weights_1K):
        return float_single_token(self, x_1D, ids_1K, weights_1K)


def view_builder(template: ExpertWeights, scratch: _Scratch) -> Callable[[dict[str, torch.Tensor]], ExpertWeights]:
    """A function from one expert's tensors (``store.ExpertLayout.views``) to a provider of
    the template's kind. Keeps the template's metadata (activation and its arguments), never
    its tensors; biases, when the experts have them, are parts of the slot like the matrices."""
    act, args = template.activation, template.act_args
    if type(template) is Experts:
        return lambda t: ResidentExperts(t["w_in"], t["w_out"], act, scratch, args, t.get("b_in"), t.get("b_out"))
    if type(template) is QuantizedExperts:
        make_in, make_out = _quant_builder(template.w_in, "w_in"), _quant_builder(template.w_out, "w_out")
        return lambda t: QuantizedExperts(make_in(t), make_out(t), act, args, t.get("b_in"), t.get("b_out"))
    raise ValueError(f"cannot offload experts of type {type(template).__name__}; "
                     "offloading takes Experts and QuantizedExperts")


def _quant_builder(w: Int8Weight | Int4Weight, prefix: str):
    if isinstance(w, Int8Weight):
        return lambda t: Int8Weight(t[f"{prefix}.qweight"], t[f"{prefix}.scale"])
    n, k, g, kernel = w.n, w.k, w.group_size, w.kernel
    return lambda t: Int4Weight(t[f"{prefix}.packed"], t[f"{prefix}.scale_zero"], n, k, g, kernel)


class OffloadedExperts(ExpertWeights):
    """The provider over a layer's ``LayerCache``; see the module docstring."""

    def __init__(self, template: ExpertWeights, cache: LayerCache):
        super().__init__(template.num_experts, template.d_model, template.d_expert, template.activation)
        self.cache, self.first_expert = cache, template.first_expert
        self.has_bias, self.act_args = template.has_bias, template.act_args
        self.quantized = isinstance(template, QuantizedExperts)
        self._dtype = template.dtype
        self.scratch = _Scratch()

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def get(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies, not views: a slot may be reused as soon as the next expert is fetched."""
        out = []
        for e in ids:
            with self.cache.use(e) as (v, _):
                (w_in, w_out), = v.get([0], dtype)
                out.append((w_in.clone(), w_out.clone()))
        return out

    def biases(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies, as ``get``."""
        out = []
        for e in ids:
            with self.cache.use(e) as (v, _):
                (b_in, b_out), = v.biases([0], dtype)
                out.append((b_in.clone(), b_out.clone()))
        return out

    def single_token(self, x_1D: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor) -> torch.Tensor:
        """One token [1, D], its K experts and weights [1, K] -> [1, D] fp32."""
        zero = ids_1K.new_zeros(1, 1)
        ys = []  # each [1, D] fp32
        for k, e in enumerate(ids_1K[0].tolist()):
            with self.cache.use(e) as (v, dev):
                ys.append(v.single_token(x_1D.to(dev), zero.to(dev), weights_1K[:, k: k + 1].to(dev)).to(x_1D.device))
        return torch.stack(ys).sum(0)

    def rows(self, x_MD: torch.Tensor, counts: torch.Tensor, weights_M: torch.Tensor,
             impl: str = "grouped") -> torch.Tensor:
        """Dispatched rows x_MD [M, D] (``counts`` [E]) -> y_MD [M, D] fp32 times ``weights_M``."""
        if self.quantized:
            return self._quant_rows(x_MD, counts, impl).float() * weights_M[:, None]
        if not x_MD.shape[0]:
            return x_MD.new_zeros(x_MD.shape, dtype=torch.float32)
        ys = [self._on_expert(e, lambda v, x, w, n: v.rows(x, n, w, impl), x_e, w_e)
              for e, x_e, w_e in self._slices(counts, x_MD, weights_M)]
        return torch.cat(ys)

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, impl: str = "grouped") -> torch.Tensor:
        """x_TD [T, D] -> [T, D] fp32, as the in-memory provider's local entry."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
        if self.quantized:
            y_MD = self._quant_rows(x_TD.index_select(0, plan.token_ids), plan.counts, impl)
            return combine(y_MD, plan, x_TD.shape[0])
        if impl == "grouped" and self.grouped_ok:
            return self._grouped(x_TD, plan)
        if impl == "grouped":
            impl = "loop"  # as the in-memory provider does (``experts.local_experts``)
        d = _LOCAL.dispatch(x_TD, plan)
        return _LOCAL.combine(self.rows(d.x_MD, d.counts, d.weights_M, impl), d)

    def _grouped(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The fused node one expert at a time, added up in expert order (module docstring)."""
        out_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32)
        for e, ids_e, w_e in self._slices(plan.counts, plan.token_ids, plan.weights):
            def run(v, x, w, n, ids=ids_e):
                b_in, b_out = v.stacked_biases()
                return grouped_moe(x, ids.to(x.device), w, v.w_in, v.w_out, n, v.activation,
                                   b_in=b_in, b_out=b_out, act_args=v.act_args)
            out_TD += self._on_expert(e, run, x_TD, w_e)
        return out_TD

    def _quant_rows(self, x_MD: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
        """``QuantizedExperts._rows``: unweighted rows [M, D] in x's dtype."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
        ys = [self._on_expert(e, lambda v, x, w, n: v._rows(x, n, impl), x_e, None)
              for e, x_e, _ in self._slices(counts, x_MD, None)]
        return torch.cat(ys) if ys else x_MD.new_zeros(0, self.d_model)

    def _slices(self, counts: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None):
        """(expert, its rows, its weights) for each expert with rows, in expert order."""
        sizes = counts.tolist()
        row_parts = rows.split(sizes)
        w_parts = weights.split(sizes) if weights is not None else [None] * len(sizes)
        return [(e, r, w) for e, (n, r, w) in enumerate(zip(sizes, row_parts, w_parts)) if n]

    def _on_expert(self, e: int, fn, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """fn(one-expert view, x, w, counts [1]) on the device the view's weights are on."""
        with self.cache.use(e) as (v, dev):
            n = torch.tensor([x.shape[0] if w is None else w.shape[0]], device=dev)  # [1] slot count
            y = fn(v, x.to(dev), None if w is None else w.to(dev), n)
        return y.to(x.device)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on any [.., D] input (tools and tests)."""
        with self.cache.use(e) as (v, dev):
            return v.expert_forward(0, x.to(dev)).to(x.device)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, capacity={self.cache.capacity}, store={self.cache.store.kind}"


__all__ = ["OffloadedExperts", "ResidentExperts", "view_builder"]
