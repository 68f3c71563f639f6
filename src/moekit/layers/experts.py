"""Routed experts: E feed-forward networks stored as stacked 3-D weights.

Shape legend: D model dim, F expert hidden width, E experts, M dispatched slots (sorted by
expert). ``w_in`` is [E, F_in, D] with F_in = 2F for SwiGLU (gate and up fused, gate first)
and F otherwise; ``w_out`` is [E, D, F]. Each expert's matrices are [out, in], like
``nn.Linear.weight`` and transformers' fused experts, so expert e computes
``F.linear(act(F.linear(x, w_in[e])), w_out[e])``. That layout is also what CPU GEMMs take
fastest in half precision and what grouped GEMM kernels take as their transposed operand.

Each impl maps the tokens and a ``DispatchPlan`` to the weighted sum of their experts'
outputs, [T, D] fp32: gather by ``plan.token_ids``, experts, weighted scatter back. Three
interchangeable ways to compute the same thing (``impl``):
- ``"grouped"``: gather, both projections and the weighted scatter as one autograd node with
  a custom backward (``grouped_mm.py``: a few experts at a time on CPU, one grouped matmul
  per projection on GPU); the training and prefill path.
- ``"decode"``: a few tokens touch a few experts: multiply only the non-empty slices against
  views of their experts' weights (no weight copies, no work for the idle experts). One token
  needs no plan at all (``single_token``, called by ``MoELayer``).
- ``"loop"``: the plain per-expert loop under autograd, kept as the readable reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.dispatch import DispatchPlan, combine
from moekit.layers.grouped_mm import grouped_moe
from moekit.layers.mlp import activate, first_proj_width

IMPLS = ("grouped", "decode", "loop")

# Expert matrices up to this size multiply a vector as a product and a row sum
# (``_StreamGemv``); larger ones through BLAS, since the product's extra write and read stop
# fitting in cache (and the scratch buffer, one matrix per layer, stops being small).
STREAM_GEMV_MAX_BYTES = 8 << 20


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_expert: int, activation: str = "swiglu"):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(num_experts, first_proj_width(d_expert, activation), d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self._gemv_scratch: torch.Tensor | None = None  # single_token's product buffer (one expert matrix)

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, impl: str = "grouped") -> torch.Tensor:
        """x_TD [T, D] -> [T, D] fp32: for each token, its kept slots' expert outputs times
        their routing weights, summed (zeros for a token with no kept slot).

        Each expert multiplies its contiguous slice of the dispatched tokens. Each expert's
        weight gradient is a tensor (zeros when it got no tokens), never missing: data-parallel
        gradient reductions would otherwise wait for it forever (the weights are single stacked
        parameters, so this holds for every impl).
        """
        if impl == "grouped":
            return grouped_moe(x_TD, plan.token_ids, plan.weights, self.w_in, self.w_out, plan.counts, self.activation)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
        if impl == "decode":
            return self._decode(x_TD, plan)
        y_MD = self._loop(x_TD[plan.token_ids], plan.counts)  # [M, D] grouped by expert
        return combine(y_MD, plan, x_TD.shape[0])

    def _decode(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Only the experts that got slots run, on views of their weights: with 1-64 tokens
        the cost is reading those experts' weights once, as for a dense FFN, plus a few
        small ops per expert. Everything else runs once over all slots: the activation, the
        routing weight (on the narrow [M, F] side) and one scatter back."""
        dtype = x_TD.dtype
        active = [(e, n) for e, n in enumerate(plan.counts.tolist()) if n]
        if not active:
            return x_TD.new_zeros(x_TD.shape, dtype=torch.float32)
        sizes = [n for _, n in active]
        w_in_T, w_out_T = self._transposed(self.w_in, dtype), self._transposed(self.w_out, dtype)
        x_MD = x_TD.index_select(0, plan.token_ids)  # [M, D]
        h = torch.cat([torch.mm(x_e, w_in_T(e)) for (e, _), x_e in zip(active, x_MD.split_with_sizes(sizes))])  # [M, H]
        a = activate(h, self.activation) * plan.weights.to(dtype)[:, None]  # [M, F]
        y = torch.cat([torch.mm(a_e, w_out_T(e)) for (e, _), a_e in zip(active, a.split_with_sizes(sizes))])  # [M, D]
        return x_TD.new_zeros(x_TD.shape, dtype=torch.float32).index_add_(0, plan.token_ids, y.float())

    def single_token(self, x_1D: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor) -> torch.Tensor:
        """One token [1, D] and its K distinct experts and routing weights [1, K] -> [1, D] fp32.

        The decode path at batch 1 without a dispatch plan: nothing to sort, group or drop
        (top-k experts are distinct, and a capacity of at least one slot each keeps them all),
        so it is K matrix-vector products per projection, and the combine is a sum."""
        dtype, x = x_1D.dtype, x_1D[0]
        ids = ids_1K[0].tolist()
        gemv = self._gemv_for(x)
        # .to(dtype): a no-op unless fp32 master weights meet half activations
        h = torch.stack([gemv(self.w_in[e].to(dtype), x) for e in ids])  # [K, H]
        a = activate(h, self.activation) * weights_1K[0].to(dtype)[:, None]  # [K, F]
        y = torch.stack([gemv(self.w_out[e].to(dtype), a_k) for e, a_k in zip(ids, a)])  # [K, D]
        return y.sum(0, keepdim=True, dtype=torch.float32)

    def _gemv_for(self, v: torch.Tensor):
        """The matrix-vector product for this layer's expert matrices and vectors like v:
        ``_StreamGemv`` for fp32 on CPU without grad, for matrices of at most
        STREAM_GEMV_MAX_BYTES; else BLAS. bf16 keeps BLAS: in the layer the streaming
        product measured no faster there, and BLAS accumulates exact products."""
        n = self.w_in[0].numel()
        small = n * v.element_size() <= STREAM_GEMV_MAX_BYTES
        if torch.is_grad_enabled() or v.device.type != "cpu" or v.dtype != torch.float32 or not small:
            return _blas_gemv
        s = self._gemv_scratch
        if s is None or s.dtype != v.dtype or s.device != v.device or s.numel() < n:
            # Kept between calls: a fresh 1-8 MB buffer per call is, in some allocator states,
            # a fresh mmap each time, whose page faults cost more than the product saves.
            s = self._gemv_scratch = v.new_empty(n)
        return _StreamGemv(s)

    @staticmethod
    def _transposed(w: torch.Tensor, dtype: torch.dtype):
        """e -> w[e]^T in ``dtype``, a view when the dtype matches (one transpose for all experts);
        otherwise (fp32 master weights, half activations) only the used experts are cast."""
        if w.dtype == dtype:
            w_T = w.mT
            return w_T.__getitem__
        return lambda e: w[e].to(dtype).t()

    def _loop(self, x_MD: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w_in, w_out = self.w_in.to(x_MD.dtype), self.w_out.to(x_MD.dtype)
        outs = []
        for e, x_e in enumerate(torch.split(x_MD, counts.tolist())):
            outs.append(F.linear(activate(F.linear(x_e, w_in[e]), self.activation), w_out[e]))  # [M_e, D]
        return torch.cat(outs) if outs else x_MD.new_zeros(0, self.d_model)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on any [.., D] input: the plain definition, used by references and tools."""
        return F.linear(activate(F.linear(x, self.w_in[e].to(x.dtype)), self.activation), self.w_out[e].to(x.dtype))

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)


def _blas_gemv(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w [N, K] @ v [K] -> [N] as a one-row mm: 5-10 % faster than torch.mv in bf16 on CPU."""
    return torch.mm(v[None], w.t())[0]


class _StreamGemv:
    """w [N, K] @ v [K] -> [N] as w * v (into a scratch buffer) and a row sum: one threaded
    streaming pass over w. At expert sizes MKL's fp32 GEMV pays a fixed cost per call that 2K
    calls per token add up: 8 experts' [512, 512] matrices, read from memory, take 1.15-1.22
    ms through mm and 0.84 ms this way (docs/benchmarks.md)."""

    def __init__(self, scratch: torch.Tensor):
        self.scratch = scratch

    def __call__(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.mul(w, v, out=self.scratch[: w.numel()].view(w.shape)).sum(-1)
