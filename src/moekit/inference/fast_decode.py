"""Fast decode: a faster small-M matmul swapped into a model's decode steps, from outside (CPU).

Shape legend: M rows a matmul sees (tokens in a decode step, or rows one expert got),
K input width, N output width; weights are [N, K] like ``nn.Linear.weight``.

Why: at batch 1 a decode step is ~95 % matrix-vector products (torch.profiler on the
``moekit bench generate`` model), and at M = 1 the BLAS libraries leave bandwidth unused:
one thread read ~8-9 GB/s through oneDNN's bf16 GEMV and ~18-27 GB/s through MKL's fp32
where an inductor-compiled "product and row sum" read ~12-19 and ~21-34 (docs/benchmarks.md);
oneDNN also spends ~30 us on a bf16 call of any size, the kernel ~2 us. At M = 2..4 MKL's
fp32 GEMM costs ~2x its M = 1 time while ``mm(w, x.T).T`` costs ~1.1x; at M >= 8, and for
bf16 at any M > 1, F.linear is the fastest of the three.

Plan:
  1. ``FastDecode(model)`` checks the device (CPU) and dtype (fp32 or bf16) and loads the
     kernel, built ahead of time by AOTInductor into inductor's cache folder on first use
     (it needs a C++ compiler: without one this fails with one line, not at the first token),
     and wraps the forward of every plain ``nn.Linear`` and dense ``MLP`` (attention
     projections, shared experts, dense FFNs, the output head; routers compute in fp32 and keep theirs).
  2. Inside ``with fd.decoding():`` (the engine's decode steps) and without grad, a matmul of
     at most MAX_ROWS rows takes ``small_linear``; the routed experts take it through their
     provider's ``decode_linear`` hook (``layers/experts.py``), set only for those steps.
     Everywhere else (prefill, training, other callers) the original forwards run unchanged.
  3. The wrappers stay on the model (inert outside ``decoding``), so several engines over one
     model share one installation; ``remove(model)`` takes them off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import UsageError
from moekit.fileio import atomic_path
from moekit.layers.experts import Experts
from moekit.layers.mlp import MLP, activate

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
MAX_ROWS = 8  # above this a decode matmul is a GEMM, and BLAS is already at its best
MM_T_MAX_ROWS = 4  # fp32 rows up to which mm(w, x.T).T beats MKL's F.linear (~2x at M = 2..4)
KERNEL_VERSION = 2  # part of the kernel cache's key: bump when _gemv or the way it is built changes
MAX_N, MAX_K = 1 << 24, 1 << 20  # the shapes the kernel is built for (any vocabulary or width in use)


def _gemv(x_1K: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """[1, K] x [N, K] -> [1, N]: one streaming pass over w, products summed in fp32 (inductor
    fuses the cast, product and row sum into one vectorized, threaded loop; nothing [N, K] is
    written)."""
    return (w_NK.float() * x_1K.float()).sum(-1)[None].to(x_1K.dtype)


class _Gemv(nn.Module):  # what torch.export takes
    def forward(self, x_1K: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        return _gemv(x_1K, w_NK)


# (dtype, intra-op threads) -> the kernel's runner. Built ahead of time (AOTInductor), not by
# torch.compile: a torch.compile'd call costs ~28 us in dynamo's guards and wrapper, a call of the
# same kernel through AOTInductor's runner ~2 us (F.linear's own overhead), so the kernel now
# pays on every matrix, the small k/v projections included (docs/benchmarks.md).
_runners: dict[tuple[torch.dtype, int], object] = {}


def kernel_path(dtype: torch.dtype, threads: int) -> Path:
    """The compiled package on disk, in inductor's cache folder, keyed by everything the code
    depends on: torch's version, the CPU's vector ISA, dtype, thread count (OpenMP's loop is
    built for it) and the kernel's source."""
    import hashlib
    import inspect

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    key = "|".join([torch.__version__, torch.backends.cpu.get_cpu_capability(), str(dtype), str(threads),
                    str(KERNEL_VERSION), inspect.getsource(_gemv)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir()) / "moekit" / f"gemv-{str(dtype).removeprefix('torch.')}-t{threads}-{digest}.pt2"


def _build(path: Path, dtype: torch.dtype, threads: int) -> None:
    """Export ``_gemv`` with dynamic N and K (one package for every matrix of a model) and
    compile it; written to a temporary name and renamed (moekit.fileio), so a package on disk
    is whole."""
    import torch._inductor

    N, K = torch.export.Dim("N", min=2, max=MAX_N), torch.export.Dim("K", min=2, max=MAX_K)
    example = (torch.randn(1, 64, dtype=dtype), torch.randn(128, 64, dtype=dtype))
    with atomic_path(path, suffix=".pt2") as tmp, _quiet_torch():  # AOTInductor wants the suffix
        ep = torch.export.export(_Gemv(), example, dynamic_shapes=({1: K}, {0: N, 1: K}))
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs={"cpp.threads": threads})


def _load(path: Path):
    """The package's runner: ``run([x, w]) -> [y]``, called directly (the package's Python
    wrapper would add ~10 us of argument flattening per call)."""
    import torch._inductor

    with _quiet_torch():
        return torch._inductor.aoti_load_package(str(path)).loader


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch 2.13's export and package loader raise a FutureWarning about its own internals
    (pytree's LeafSpec), which a user of --fast-decode can do nothing about."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        yield


def _kernel(dtype: torch.dtype, log: Callable[[str], None] | None = None):
    """The runner for ``dtype`` at the current thread count: loaded from inductor's cache
    folder, or built there first (~10-25 s, once per machine, torch version, dtype and thread count)."""
    threads = torch.get_num_threads()
    runner = _runners.get((dtype, threads))
    if runner is None:
        path = kernel_path(dtype, threads)
        if path.exists():
            try:
                runner = _load(path)
            except Exception:  # a package another torch or a crash left: build it again
                path.unlink(missing_ok=True)
        if runner is None:
            if log is not None:
                log(f"fast decode: compiling its {str(dtype).removeprefix('torch.')} kernel for {threads} "
                    f"thread(s) (once: kept in {path.parent})")
            _build(path, dtype, threads)
            runner = _load(path)
        _runners[(dtype, threads)] = runner
    return runner


def small_linear(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x_MK [M, K] @ w_NK.T -> [M, N] in x's dtype (no bias), by the path that measured fastest
    for that M and dtype on CPU (module docstring)."""
    M, K = x_MK.shape
    N = w_NK.shape[0]
    if M == 1 and 2 <= N <= MAX_N and 2 <= K <= MAX_K and w_NK.dtype == x_MK.dtype and w_NK.is_contiguous():
        return _kernel(x_MK.dtype).run([x_MK.contiguous(), w_NK.detach()])[0]
    if M <= MM_T_MAX_ROWS and x_MK.dtype == torch.float32:
        return torch.mm(w_NK, x_MK.t()).t().contiguous()  # [N, M] -> [M, N]; the copy is M*N, tiny
    return F.linear(x_MK, w_NK)


def check_supported(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cpu" or dtype not in SUPPORTED_DTYPES:
        raise UsageError(f"fast decode runs on CPU in fp32 or bf16; this model is {str(dtype).removeprefix('torch.')} "
                         f"on {device.type}")


def compile_check(dtype: torch.dtype, log: Callable[[str], None] | None = None) -> None:
    """Build (or load) the kernel for ``dtype`` now and run it on a tiny input: a machine
    without a C++ compiler fails here with one line, not at the first token."""
    w = torch.randn(40, 24, dtype=dtype)
    try:
        with torch.inference_mode():
            y = _kernel(dtype, log).run([torch.randn(1, 24, dtype=dtype), w])[0]
    except Exception as e:  # inductor raises many kinds; all mean the same thing here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"fast decode could not compile its kernel with AOTInductor (it needs a working C++ "
                         f"compiler): {first}") from None
    if y.shape != (1, 40):  # a package that does not compute what _gemv does must not be used
        raise UsageError(f"fast decode's kernel returned shape {tuple(y.shape)} for (1, 40)")


class FastDecode:
    """The installation on one model; ``decoding()`` turns it on for one forward."""

    def __init__(self, model: nn.Module, log: Callable[[str], None] | None = None):
        p = next(model.parameters())
        check_supported(p.device, p.dtype)
        compile_check(p.dtype, log)
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


def install(model: nn.Module, log: Callable[[str], None] | None = None) -> FastDecode:
    """The model's FastDecode, installed on first use (kept in the model's ``__dict__``, not
    as a submodule or state); ``log`` hears of a kernel being compiled."""
    fd = model.__dict__.get("_fast_decode")
    if fd is None:
        fd = model.__dict__["_fast_decode"] = FastDecode(model, log)
    return fd


def remove(model: nn.Module) -> None:
    """Restore the model's own forwards."""
    fd = model.__dict__.pop("_fast_decode", None)
    if fd is not None:
        fd.remove()


__all__ = ["FastDecode", "install", "remove", "small_linear", "check_supported", "kernel_path", "MAX_ROWS",
           "SUPPORTED_DTYPES"]
