"""Fast decode: a faster small-M matmul swapped into a model's decode steps, from outside (CPU).

Shape legend: M rows a matmul sees (tokens in a decode step, or rows one expert got),
K input width, N output width; weights are [N, K] like ``nn.Linear.weight``.

Why: at batch 1 a decode step is ~95 % matrix-vector products (torch.profiler on the
``moekit bench generate`` model), and at M = 1 the BLAS libraries leave bandwidth unused:
one thread read ~8-9 GB/s through oneDNN's bf16 GEMV and ~18-27 GB/s through MKL's fp32
where an inductor-compiled "product and row sum" read ~12-19 and ~21-34 (docs/benchmarks.md).
At M = 2..4 MKL's fp32 GEMM costs ~2x its M = 1 time while ``mm(w, x.T).T`` costs ~1.1x; at
M >= 8, and for bf16 at any M > 1, F.linear is the fastest of the three.

Plan:
  1. ``FastDecode(model)`` checks the device (CPU) and dtype (fp32 or bf16), compiles the
     kernel on a tiny input (torch.compile needs a C++ compiler: without one this fails with
     one line, not at the first token), and wraps the forward of every plain ``nn.Linear`` and
     dense ``MLP`` (attention projections, shared experts, dense FFNs, the output head).
  2. Inside ``with fd.decoding():`` (the engine's decode steps) and without grad, a matmul of
     at most MAX_ROWS rows takes ``small_linear``; the routed experts take it through their
     provider's ``decode_linear`` hook (``layers/experts.py``), set only for those steps.
     Everywhere else (prefill, training, other callers) the original forwards run unchanged.
  3. The wrappers stay on the model (inert outside ``decoding``), so several engines over one
     model share one installation; ``remove(model)`` takes them off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import UsageError
from moekit.layers.experts import Experts
from moekit.layers.mlp import MLP, activate

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
MAX_ROWS = 8  # above this a decode matmul is a GEMM, and BLAS is already at its best
MM_T_MAX_ROWS = 4  # fp32 rows up to which mm(w, x.T).T beats MKL's F.linear (~2x at M = 2..4)
# A compiled call costs ~30 us more than F.linear's ~2 us (dynamo's guards and wrapper), which
# a matrix must take ~60 us to read to earn back: below this size M = 1 keeps F.linear (on the
# 49M quick bench model, all of whose fp32 matrices are 1-3 MB, the kernel everywhere was 0.98x).
MIN_KERNEL_BYTES = 2 << 20


def _gemv(x_1K: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """[1, K] x [N, K] -> [1, N]: one streaming pass over w, products summed in fp32 (inductor
    fuses the cast, product and row sum into one vectorized, threaded loop; nothing [N, K] is
    written)."""
    return (w_NK.float() * x_1K.float()).sum(-1)[None].to(x_1K.dtype)


_compiled: dict[int, object] = {}  # intra-op threads -> the compiled kernel


def _kernel():
    """The compiled ``_gemv`` for the current thread count. dynamic: one kernel for every
    (N, K) (a model has 4-6 distinct shapes); a new dtype compiles once more. ``cpp.threads``
    bakes the thread count into the kernel's OpenMP loop and into inductor's cache key: without
    it a kernel cached by a process with more threads was reused as is, and its extra OpenMP
    thread on a busy machine made it 3x slower than BLAS instead of 2x faster."""
    n = torch.get_num_threads()
    if n not in _compiled:
        _compiled[n] = torch.compile(_gemv, dynamic=True, options={"cpp.threads": n})
    return _compiled[n]


def small_linear(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x_MK [M, K] @ w_NK.T -> [M, N] in x's dtype (no bias), by the path that measured fastest
    for that M and dtype on CPU (module docstring)."""
    M = x_MK.shape[0]
    if M == 1 and w_NK.numel() * w_NK.element_size() >= MIN_KERNEL_BYTES:
        # detach: dynamo keeps a Parameter's shape static, and would compile once per shape
        return _kernel()(x_MK.contiguous(), w_NK.detach())
    if M <= MM_T_MAX_ROWS and x_MK.dtype == torch.float32:
        return torch.mm(w_NK, x_MK.t()).t().contiguous()  # [N, M] -> [M, N]; the copy is M*N, tiny
    return F.linear(x_MK, w_NK)


def check_supported(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu" or dtype not in SUPPORTED_DTYPES:
        raise UsageError(f"fast decode runs on CPU in fp32 or bf16; this model is {str(dtype).removeprefix('torch.')} "
                         f"on {device.type}")


def compile_check(dtype: torch.dtype) -> None:
    """Compile (or fetch) the kernel for ``dtype`` now, on a tiny input: a machine without a
    C++ compiler fails here with one line."""
    w = torch.randn(40, 24, dtype=dtype)  # made outside inference mode, like the model's weights
    try:
        with torch.inference_mode():  # an inference-mode input, as the engine's steps pass (else a recompile)
            _kernel()(torch.randn(1, 24, dtype=dtype), w)
    except Exception as e:  # inductor raises many kinds; all mean the same thing here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"fast decode could not compile its kernel with torch.compile (it needs a working C++ "
                         f"compiler): {first}") from None


class FastDecode:
    """The installation on one model; ``decoding()`` turns it on for one forward."""

    def __init__(self, model: nn.Module):
        p = next(model.parameters())
        check_supported(p.device, p.dtype)
        compile_check(p.dtype)
        self.active = False
        self.experts = [m for m in model.modules() if type(m) is Experts]  # other providers keep their own compute
        self._originals: list[tuple[nn.Module, object]] = []
        for m in model.modules():
            if type(m) is nn.Linear:
                self._wrap(m, self._linear_forward(m))
            elif type(m) is MLP:
                self._wrap(m, self._mlp_forward(m))

    def _wrap(self, m: nn.Module, forward) -> None:
        self._originals.append((m, m.__dict__.get("forward")))
        m.forward = forward  # an instance attribute: this module only, state dict unchanged

    def engaged(self, x: torch.Tensor) -> bool:
        """The fast path applies: a decode step, no autograd, few rows."""
        return self.active and not torch.is_grad_enabled() and x.numel() <= MAX_ROWS * x.shape[-1]

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear's contract (x [..., K], w [N, K], b [N]) with ``small_linear`` when engaged."""
        if not self.engaged(x):
            return F.linear(x, w, b)
        y = small_linear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
        return y if b is None else y + b

    def _linear_forward(self, m: nn.Linear):
        original = m.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.linear(x, m.weight, m.bias) if self.engaged(x) else original(x)
        return forward

    def _mlp_forward(self, m: MLP):
        original = m.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not self.engaged(x):
                return original(x)
            h = self.linear(x, m.w_in.weight.to(x.dtype))  # as MLP.forward, with the fast matmul
            return self.linear(activate(h, m.activation, *m.act_args), m.w_out.weight.to(x.dtype))
        return forward

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """On for the forwards inside: the wrapped modules and the experts' decode hook."""
        self.active = True
        for e in self.experts:
            e.decode_linear = self.linear
        try:
            yield
        finally:
            self.active = False
            for e in self.experts:
                e.decode_linear = None

    def remove(self) -> None:
        for m, forward in self._originals:
            if forward is None:
                del m.forward
            else:
                m.forward = forward
        self._originals = []


def install(model: nn.Module) -> FastDecode:
    """The model's FastDecode, installed on first use (kept in the model's ``__dict__``, not
    as a submodule or state)."""
    fd = model.__dict__.get("_fast_decode")
    if fd is None:
        fd = model.__dict__["_fast_decode"] = FastDecode(model)
    return fd


def remove(model: nn.Module) -> None:
    """Restore the model's own forwards."""
    fd = model.__dict__.pop("_fast_decode", None)
    if fd is not None:
        fd.remove()


__all__ = ["FastDecode", "install", "remove", "small_linear", "check_supported", "MAX_ROWS", "SUPPORTED_DTYPES"]
