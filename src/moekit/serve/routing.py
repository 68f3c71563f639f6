"""MoE telemetry for the server: which experts the tokens used, per request and since start.

Shape legend: L MoE layers, T tokens in one forward, K experts per token, E experts.

Per request, the engine records for every generated token the experts [L][K] of the forward
position that produced it (``Sequence.routing``); ``count_experts`` turns those into the
request's ``usage.moe``. Server-wide, ``MoEStats`` hooks every MoE layer's router and counts
the experts of every real token of every forward (prompts and generated tokens; padding,
which the router sees as ``valid_T`` False, is left out). Hooks only observe: the model's
numerics and fast paths are untouched.
"""

from __future__ import annotations

import threading
from collections import Counter

import torch
from torch import nn


def count_experts(routing: list[list[list[int]]], num_experts: list[int]) -> list[list[int]]:
    """Per-token expert ids [N tokens][L][K] -> tokens per expert per layer [L][E]."""
    counts = [[0] * e for e in num_experts]
    for token in routing:
        for layer, ids in zip(counts, token):
            for e in ids:
                layer[e] += 1
    return counts


class MoEStats:
    """Load per expert per layer since start, and the batch sizes decode steps ran at
    (``GET /v1/moe/stats``). Updated on the engine thread, read by request handlers."""

    def __init__(self, model: nn.Module):
        layers = model.moe_layers() if hasattr(model, "moe_layers") else []
        self.num_experts = [layer.cfg.num_experts for layer in layers]  # [L]
        self._load = [torch.zeros(e, dtype=torch.int64) for e in self.num_experts]  # [L][E]
        self._tokens = 0  # real tokens routed (counted at the first MoE layer)
        self._batch_sizes: Counter[int] = Counter()
        self._lock = threading.Lock()
        for i, layer in enumerate(layers):
            if layer.cfg.router != "expert_choice":  # expert choice picks tokens, not experts per token
                layer.router.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def count(_module, args, out) -> None:
            valid_T = args[1] if len(args) > 1 else None  # Router.forward(x_TD, valid_T)
            ids_TK = out.ids if valid_T is None else out.ids[valid_T]  # [T_real, K]
            load = torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts[i]).cpu()
            with self._lock:
                self._load[i] += load
                if i == 0:
                    self._tokens += ids_TK.shape[0]
        return count

    def count_step(self, decode_batch: int) -> None:
        if decode_batch:
            with self._lock:
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
                "tokens": self._tokens,
                "layers": layers,
                "max_violation": max((layer["max_violation"] for layer in layers), default=0.0),
                "decode_batch_sizes": {str(b): n for b, n in sorted(self._batch_sizes.items())},
            }


__all__ = ["MoEStats", "count_experts"]
