"""Building a model's structure on the meta device (shapes and dtypes, no memory), cheaply.

``with torch.device("meta")`` alone still runs every module's initializer on its meta tensors.
``normal_`` has no native meta kernel: its meta version is a Python reference whose first call
imports torch's compiler stack (torch._dynamo, sympy, ...), which then stays resident for the
rest of the process: about 67 MiB and a second of import time, for random numbers nobody reads.
``Module.to_empty`` has the same trap (``empty_like`` of a meta tensor imports sympy: 34 MiB).
Together they were all that ``from_pretrained`` left resident beyond the weights (docs/benchmarks.md,
peak memory of ``moekit bench generate``).

``on_meta()`` builds on the meta device and skips the random initializers for meta tensors (real
tensors are initialized as always, so a model built beside it, in another thread, is unaffected);
``materialize()`` then allocates the structure on a real device through ``torch.empty``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# The initializers that reach normal_ (uniform_, zero_ and fill_ have native meta kernels).
_RANDOM_INITS = {torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.Tensor.normal_}


class _SkipMetaInit(TorchFunctionMode):
    """Returns a meta tensor unchanged instead of filling it with random numbers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_INITS:
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Modules constructed inside live on the meta device, their initializers not run."""
    with torch.device("meta"), _SkipMetaInit():
        yield


def materialize(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Allocate a meta-built ``module`` on ``device`` in place: parameters uninitialized (the
    caller fills them), buffers and plain tensor attributes (e.g. a zero aux loss) zeroed. Like
    ``to_empty``, each module gets its own tensors: tied weights must be tied again after."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            setattr(m, name, torch.zeros(b.shape, dtype=b.dtype, device=device))  # persistent ones are loaded next
        for attr, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(m, attr, torch.zeros(value.shape, dtype=value.dtype, device=device))
    return module


__all__ = ["materialize", "on_meta"]
