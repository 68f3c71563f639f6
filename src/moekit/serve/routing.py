"""Which experts each token was routed to, read from the routers during serving.

Shape legend: L MoE layers, T tokens in one forward, K experts per token, E experts.

A forward hook on every MoE layer's router keeps the last ``RouterOutput.ids`` [T, K]; the
backend takes them after its forward and keeps the rows of real tokens. Hooks observe only:
the model's numerics and its fast paths are untouched. Expert-choice routers (ids are token
ids per expert, not experts per token) have no per-token view, so they record nothing.
"""

from __future__ import annotations

import threading
from collections import Counter

import torch
from torch import nn


class RoutingRecorder:
    """Router hooks on ``model`` (anything with ``moe_layers()``); ``take()`` after a forward
    returns one [T, K] int64 tensor per MoE layer, in depth order (empty list for a dense model)."""

    def __init__(self, model: nn.Module):
        layers = model.moe_layers() if hasattr(model, "moe_layers") else []
        self.num_experts = [layer.cfg.num_experts for layer in layers]  # [L]
        self._last: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = [layer.router.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        def keep(_module, _args, out) -> None:
            self._last[i] = None if out.expert_choice else out.ids.detach()

        return keep

    def take(self) -> list[torch.Tensor] | None:
        """The last forward's expert ids per layer ([T, K] each), or None when not recordable."""
        last, self._last = self._last, [None] * len(self._last)
        if not last or any(ids is None for ids in last):
            return None
        return [ids.cpu() for ids in last]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def count_experts(experts_LTK: list[torch.Tensor], num_experts: list[int]) -> list[list[int]]:
    """Tokens per expert per layer: [L][E] counts of the ids in each [T, K] tensor."""
    return [torch.bincount(ids.reshape(-1), minlength=e).tolist() for ids, e in zip(experts_LTK, num_experts)]


class MoEStats:
    """Server-wide load since start (``GET /v1/moe/stats``): tokens per expert per layer and
    the batch sizes the decode steps ran at. Written by the engine thread, read by handlers."""

    def __init__(self, num_experts: list[int]):
        self.num_experts = num_experts
        self._load = [torch.zeros(e, dtype=torch.int64) for e in num_experts]  # [L][E]
        self._batch_sizes: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.prefill_tokens = 0
        self.decode_tokens = 0

    def add(self, experts_LTK: list[torch.Tensor] | None, decode_batch: int | None = None) -> None:
        """Count one forward's real tokens; ``decode_batch`` is its batch size for a decode step."""
        with self._lock:
            if experts_LTK is not None:
                for load, ids, e in zip(self._load, experts_LTK, self.num_experts):
                    load += torch.bincount(ids.reshape(-1), minlength=e)
                tokens = experts_LTK[0].shape[0] if experts_LTK else 0
                if decode_batch is None:
                    self.prefill_tokens += tokens
                else:
                    self.decode_tokens += tokens
            if decode_batch is not None:
                self._batch_sizes[decode_batch] += 1

    def snapshot(self) -> dict:
        with self._lock:
            layers = []
            for i, load in enumerate(self._load):
                mean = load.double().mean()
                violation = float(load.max() / mean - 1) if mean > 0 else 0.0  # max load / mean load - 1
                layers.append({"moe_layer": i, "tokens_per_expert": load.tolist(), "max_violation": violation})
            return {
                "object": "moe.stats",
                "layers": layers,
                "max_violation": max((layer["max_violation"] for layer in layers), default=0.0),
                "decode_batch_sizes": {str(b): n for b, n in sorted(self._batch_sizes.items())},
                "prefill_tokens": self.prefill_tokens,
                "decode_tokens": self.decode_tokens,
            }


__all__ = ["RoutingRecorder", "MoEStats", "count_experts"]
