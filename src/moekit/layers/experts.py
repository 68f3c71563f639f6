"""Routed experts: the FFN of each expert, computed on the rows dispatched to it.

Shape legend: D model dim, F expert hidden width, H first-projection width (2F for SwiGLU,
gate and up fused, gate first; F otherwise), E experts, T tokens, M dispatched rows (grouped
by expert). Each expert's matrices are [out, in], like ``nn.Linear.weight`` and transformers'
fused experts: expert e computes ``F.linear(act(F.linear(x, w_in[e])), w_out[e])``. That
layout is also what CPU GEMMs take fastest in half precision and what grouped GEMM kernels
take as their transposed operand.

The compute reads weights only through an ``ExpertWeights`` provider (``weights.py``) and
sees only dispatched rows: ``expert_rows(weights, x_MD, counts, weights_M, impl)`` -> y_MD
[M, D] fp32, each row its expert's output times its routing weight. Three interchangeable
ways to compute the same thing (``impl``):
- ``"grouped"``: both projections as one autograd node with a custom backward
  (``grouped_mm.py``: a few experts at a time on CPU, one grouped matmul per projection on
  GPU); the training and prefill path.
- ``"decode"``: a few rows touch a few experts: only those experts' weights are fetched, and
  only the non-empty slices multiply (no weight copies, no work for the idle experts).
- ``"loop"``: the plain per-expert loop under autograd, kept as the readable reference.

``Experts`` is the layer's default: dense stacked weights (``w_in`` [E, H, D], ``w_out``
[E, D, F]) plus the token-level entry ``forward(x_TD, plan, impl)`` -> [T, D] fp32 for a
local dispatch. With plain weights its grouped impl is the fused local fast path: gather,
experts and weighted scatter in one node. ``single_token`` is decode at batch 1, with no plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.dispatch import DispatchPlan, LocalDispatcher
from moekit.layers.grouped_mm import grouped_moe
from moekit.layers.mlp import activate, first_proj_width
from moekit.layers.weights import ExpertWeights

IMPLS = ("grouped", "decode", "loop")

# Expert matrices up to this size multiply a vector as a product and a row sum
# (``_StreamGemv``); larger ones through BLAS, since the product's extra write and read stop
# fitting in cache (and the scratch buffer, one matrix per layer, stops being small).
STREAM_GEMV_MAX_BYTES = 8 << 20


def expert_rows(weights: ExpertWeights, x_MD: torch.Tensor, counts: torch.Tensor, weights_M: torch.Tensor,
                impl: str = "grouped") -> torch.Tensor:
    """Dispatched rows x_MD [M, D] (``counts`` [E] per expert, in order) -> y_MD [M, D] fp32,
    row m = weights_M[m] * its expert's output. Every expert's weight gradient is a tensor
    (zeros when it got no rows), never missing: data-parallel gradient reductions would
    otherwise wait for it forever."""
    if impl == "grouped" and not weights.grouped_ok:
        impl = "loop"  # an activation the grouped node lacks (see ExpertWeights.grouped_ok)
    if impl == "grouped":
        w_in, w_out = weights.stacked()
        b_in, b_out = weights.stacked_biases()
        rows = torch.arange(x_MD.shape[0], device=x_MD.device)  # gather and scatter are identities
        return grouped_moe(x_MD, rows, weights_M, w_in, w_out, counts, weights.activation,
                           b_in=b_in, b_out=b_out, act_args=weights.act_args)
    if impl == "decode":
        return _decode_rows(weights, x_MD, counts, weights_M)
    if impl == "loop":
        return _loop_rows(weights, x_MD, counts, weights_M)
    raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")


def _decode_rows(weights: ExpertWeights, x_MD: torch.Tensor, counts: torch.Tensor,
                 weights_M: torch.Tensor) -> torch.Tensor:
    """Only the experts that got rows are fetched and run: with 1-64 tokens the cost is
    reading those experts' weights once, as for a dense FFN, plus a few small ops per expert.
    The activation and the routing weight (on the narrow [M, F] side) run once over all rows."""
    dtype = x_MD.dtype
    active = [(e, n) for e, n in enumerate(counts.tolist()) if n]
    if not active:
        return x_MD.new_zeros(x_MD.shape, dtype=torch.float32)
    sizes = [n for _, n in active]
    ids = [e for e, _ in active]
    pairs = weights.get(ids, dtype)
    b = weights.biases(ids, dtype) if weights.has_bias else [(None, None)] * len(ids)
    linear = _linear_for(weights)
    h = torch.cat([linear(x_e, w_in, b_in) for (w_in, _), (b_in, _), x_e
                   in zip(pairs, b, x_MD.split_with_sizes(sizes))])  # [M, H]
    w_M1 = weights_M.to(dtype)[:, None]
    a = activate(h, weights.activation, *weights.act_args) * w_M1  # [M, F]
    y = torch.cat([linear(a_e, w_out) for (_, w_out), a_e in zip(pairs, a.split_with_sizes(sizes))])  # [M, D]
    if weights.has_bias:  # the output bias is part of the expert, so it is weighted too
        y = y + torch.cat([b_out.expand(n, -1) for (_, b_out), n in zip(b, sizes)]) * w_M1
    return y.float()


def _few_rows_linear(x_RK: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` for the few rows (R = 1-64) one expert gets in a decode step.

    fp32 on CPU computes it as (w @ x^T)^T: the same products, but MKL's SGEMM takes the
    weight-major orientation 1.4-2.6x faster at these shapes (one [2048, 512] expert matrix,
    4 rows, one thread: 0.18-0.35 ms against 0.48 ms; x @ w^T reads the weight through its
    slow transposed-B path on this AMD EPYC). bf16 goes to oneDNN, where F.linear is the
    faster one (0.12 ms against 0.41 ms), so it keeps F.linear."""
    if x_RK.dtype != torch.float32 or x_RK.device.type != "cpu":
        return F.linear(x_RK, w_NK, b_N)
    y_RN = torch.mm(w_NK, x_RK.t()).t()  # [R, N], a transposed view: torch.cat makes it contiguous
    return y_RN if b_N is None else y_RN + b_N


def _loop_rows(weights: ExpertWeights, x_MD: torch.Tensor, counts: torch.Tensor,
               weights_M: torch.Tensor) -> torch.Tensor:
    """The reference: each expert on its slice, then the routing weight in fp32."""
    E = weights.num_experts
    pairs = weights.get(range(E), x_MD.dtype)
    b = weights.biases(range(E), x_MD.dtype) if weights.has_bias else [(None, None)] * E
    outs = [F.linear(activate(F.linear(x_e, w_in, b_in), weights.activation, *weights.act_args), w_out, b_out)  # [M_e, D]
            for (w_in, w_out), (b_in, b_out), x_e in zip(pairs, b, torch.split(x_MD, counts.tolist()))]
    y_MD = torch.cat(outs) if outs else x_MD.new_zeros(0, weights.d_model)
    return y_MD.float() * weights_M[:, None]


def single_token(weights: ExpertWeights, x_1D: torch.Tensor, ids_1K: torch.Tensor,
                 weights_1K: torch.Tensor) -> torch.Tensor:
    """One token [1, D] and its K distinct experts and routing weights [1, K] -> [1, D] fp32.

    The decode path at batch 1 without a dispatch plan: nothing to sort, group or drop
    (top-k experts are distinct, and a capacity of at least one slot each keeps them all),
    so it is K matrix-vector products per projection, and the combine is a sum. Only the
    K routed experts' weights are fetched."""
    dtype, x = x_1D.dtype, x_1D[0]
    gemv = _gemv_for(weights, x)
    ids = ids_1K[0].tolist()
    pairs = weights.get(ids, dtype)
    h = torch.stack([gemv(w_in, x) for w_in, _ in pairs])  # [K, H]
    w_K1 = weights_1K[0].to(dtype)[:, None]
    if weights.has_bias:
        b_in, b_out = (torch.stack(b) for b in zip(*weights.biases(ids, dtype)))  # [K, H], [K, D]
        h = h + b_in
    a = activate(h, weights.activation, *weights.act_args) * w_K1  # [K, F]
    y = torch.stack([gemv(w_out, a_k) for (_, w_out), a_k in zip(pairs, a)])  # [K, D]
    if weights.has_bias:
        y = y + b_out * w_K1
    return y.sum(0, keepdim=True, dtype=torch.float32)


def _gemv_for(weights: ExpertWeights, v: torch.Tensor):
    """The matrix-vector product for these expert matrices and vectors like v:
    ``_StreamGemv`` for fp32 on CPU without grad, for matrices of at most
    STREAM_GEMV_MAX_BYTES; else BLAS. bf16 keeps BLAS: in the layer the streaming
    product measured no faster there, and BLAS accumulates exact products. A decode hook
    (``_linear_for``) comes first."""
    if (fast := _linear_for(weights)) is not _few_rows_linear:
        return lambda w, v: fast(v[None], w)[0]
    n = first_proj_width(weights.d_expert, weights.activation) * weights.d_model  # the larger matrix
    small = n * v.element_size() <= STREAM_GEMV_MAX_BYTES
    if torch.is_grad_enabled() or v.device.type != "cpu" or v.dtype != torch.float32 or not small:
        return _blas_gemv
    s = getattr(weights, "_gemv_scratch", None)
    if s is None or s.dtype != v.dtype or s.device != v.device or s.numel() < n:
        # Kept between calls (one matrix per layer): a fresh 1-8 MB buffer per call is, in
        # some allocator states, a fresh mmap each time, whose page faults cost more than
        # the product saves.
        s = weights._gemv_scratch = v.new_empty(n)
    return _StreamGemv(s)


def _linear_for(weights: ExpertWeights):
    """``_few_rows_linear``, or the provider's ``decode_linear`` (same contract as F.linear),
    which an engine's fast decode (``inference/fast_decode.py``) sets for its decode steps
    only; never under grad."""
    fast = getattr(weights, "decode_linear", None)
    return _few_rows_linear if fast is None or torch.is_grad_enabled() else fast


class Experts(ExpertWeights):
    """E dense experts as two stacked parameters, ``w_in`` [E, H, D] and ``w_out`` [E, D, F]:
    the default weights provider, with the token-level entry for a local dispatch."""

    plain = True
    decode_linear = None  # set by inference/fast_decode.py during decode steps: see _linear_for

    def __init__(self, num_experts: int, d_model: int, d_expert: int, activation: str = "swiglu",
                 bias: bool = False, act_args: tuple = ()):
        super().__init__(num_experts, d_model, d_expert, activation)
        self.w_in = nn.Parameter(torch.empty(num_experts, first_proj_width(d_expert, activation), d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.has_bias, self.act_args = bias, tuple(act_args)
        if bias:  # b_in [E, H], b_out [E, D]
            self.b_in = nn.Parameter(torch.empty(num_experts, self.w_in.shape[1]))
            self.b_out = nn.Parameter(torch.empty(num_experts, d_model))
        self._gemv_scratch: torch.Tensor | None = None  # single_token's product buffer (one expert matrix)

    def get(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Views when the dtype matches; otherwise (fp32 master weights, half activations) only
        # the asked-for experts are cast.
        w_in, w_out = self.w_in, self.w_out
        if w_in.dtype == dtype:
            return [(w_in[e], w_out[e]) for e in ids]
        return [(w_in[e].to(dtype), w_out[e].to(dtype)) for e in ids]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_in, self.w_out

    def biases(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.b_in[e].to(dtype), self.b_out[e].to(dtype)) for e in ids]

    def stacked_biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (self.b_in, self.b_out) if self.has_bias else (None, None)

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    def rows(self, x_MD: torch.Tensor, counts: torch.Tensor, weights_M: torch.Tensor,
             impl: str = "grouped") -> torch.Tensor:
        return expert_rows(self, x_MD, counts, weights_M, impl)

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, impl: str = "grouped") -> torch.Tensor:
        """x_TD [T, D] -> [T, D] fp32: for each token, its kept slots' expert outputs times
        their routing weights, summed (zeros for a token with no kept slot). "grouped" is the
        fused node; the others dispatch, compute and combine in three steps."""
        return local_experts(self, x_TD, plan, impl)

    def single_token(self, x_1D: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor) -> torch.Tensor:
        return single_token(self, x_1D, ids_1K, weights_1K)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on any [.., D] input: the plain definition, used by references and tools."""
        (w_in, w_out), = self.get([e], x.dtype)
        (b_in, b_out), = self.biases([e], x.dtype) if self.has_bias else [(None, None)]
        return F.linear(activate(F.linear(x, w_in, b_in), self.activation, *self.act_args), w_out, b_out)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=out_std)
        if self.has_bias:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)


_LOCAL = LocalDispatcher()


def local_experts(weights: ExpertWeights, x_TD: torch.Tensor, plan: DispatchPlan, impl: str) -> torch.Tensor:
    """Local dispatch, experts, combine: x_TD [T, D] -> [T, D] fp32. With plain weights the
    grouped impl is the fused node (``grouped_mm.py``), which never materializes the rows."""
    if impl == "grouped" and not weights.grouped_ok:
        impl = "loop"  # an activation the grouped node lacks: see ExpertWeights.grouped_ok
    if impl == "grouped" and weights.plain:
        w_in, w_out = weights.stacked()
        b_in, b_out = weights.stacked_biases()
        return grouped_moe(x_TD, plan.token_ids, plan.weights, w_in, w_out, plan.counts, weights.activation,
                           b_in=b_in, b_out=b_out, act_args=weights.act_args)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    d = _LOCAL.dispatch(x_TD, plan)
    return _LOCAL.combine(expert_rows(weights, d.x_MD, d.counts, d.weights_M, impl), d)


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
