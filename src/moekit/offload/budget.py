"""``--max-memory GB``: one total for the model, from which the expert cache is derived.

    expert cache = max_memory - non-expert weights - KV cache

The non-expert weights are everything but the routed experts, in the model's dtype (routers
in fp32, as moekit keeps them); the KV cache is the one for the model's whole context
(``max_seq_len`` tokens) times ``kv_sequences`` (1 for generate and chat, ``--max-batch`` for
serve), so a run never needs more than the total whatever the prompt. Activations, the
allocator and the interpreter are not counted (``docs/benchmarks.md`` measures them). A total
that the non-expert part alone does not fit is an error naming both numbers.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from moekit.config import ModelConfig
from moekit.errors import UsageError
from moekit.layers.kv_cache import kv_values_per_token

_EXPERTS = re.compile(r"blocks\.(\d+)\.ffn\.experts\.(.+)")


def resident_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of a model's tensors other than the routed experts: as they are, or (a meta model)
    as they will be in ``dtype``, routers fp32. The tied output matrix counts once."""
    total, seen = 0, set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if _EXPERTS.fullmatch(name) or id(t) in seen:
            continue
        seen.add(id(t))
        size = t.element_size()
        if dtype is not None and t.is_floating_point() and ".ffn.router." not in name:
            size = dtype.itemsize
        total += t.numel() * size
    return total


def kv_bytes(cfg: ModelConfig, sequences: int, dtype: torch.dtype) -> int:
    """The KV cache of ``sequences`` sequences of the whole context (``layers/kv_cache.py``)."""
    return kv_values_per_token(cfg) * cfg.max_seq_len * sequences * dtype.itemsize


def resolve_budget(ocfg, cfg: ModelConfig, resident: int, dtype: torch.dtype):
    """``ocfg`` with ``cache_gb`` set from ``max_memory_gb`` (unchanged when it has a cache size);
    UsageError when the non-expert weights and the KV cache alone do not fit."""
    if ocfg.cache_gb is not None:
        return ocfg
    kv = kv_bytes(cfg, ocfg.kv_sequences, dtype)
    left = ocfg.max_memory_gb * 1e9 - resident - kv
    if left <= 0:
        raise UsageError(f"--max-memory {ocfg.max_memory_gb:g} does not fit the resident part: non-expert weights "
                         f"{resident / 1e9:.3g} GB + KV cache {kv / 1e9:.3g} GB ({ocfg.kv_sequences} x "
                         f"{cfg.max_seq_len} tokens) = {(resident + kv) / 1e9:.3g} GB, before any expert")
    return dataclasses.replace(ocfg, cache_gb=left / 1e9)


__all__ = ["resident_bytes", "kv_bytes", "resolve_budget"]
