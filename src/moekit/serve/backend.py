"""What the scheduler needs from a model, and one model-agnostic way to provide it.

Shape legend: B sequences in a step, S prompt tokens, V vocabulary, L MoE layers, K experts
per token.

A backend owns ``num_slots`` sequence slots. The scheduler prefills a prompt into a free
slot, then advances any set of occupied slots by one token together, and releases a slot
when its sequence retires or is cancelled. Every call returns next-token logits and, when
the router can be read, the experts of the tokens it just ran (``routing.py``).

``KVCacheBackend`` is the real one: the model's preallocated KV cache (layers/kv_cache.py)
with one slot per sequence, so a decode step runs one new token per sequence.
``RecomputeBackend`` keeps each slot's tokens and runs the whole batch of contexts again at
every step (right-padded; attention is causal, so padding after a sequence's last token
cannot reach it). It needs nothing but ``model(ids, attention_mask)``: the reference the
cached one is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moekit.serve.routing import RoutingRecorder


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, V] fp32: next-token logits per row (B = 1 for a prefill)
    experts: list[torch.Tensor] | None  # per MoE layer: [S, K] for a prefill, [B, K] for a decode step


class Backend(Protocol):
    num_slots: int  # sequences that can be live at once
    max_len: int  # prompt + generated tokens per sequence
    num_experts: list[int]  # per MoE layer, for counting (empty for a dense model)

    def prefill(self, slot: int, ids: list[int]) -> StepOutput: ...

    def decode(self, slots: list[int], tokens: list[int]) -> StepOutput: ...

    def release(self, slot: int) -> None: ...


class RecomputeBackend:
    """Slots hold token lists; every step is one full forward of the running contexts."""

    def __init__(self, model: nn.Module, num_slots: int, max_len: int | None = None):
        self.model = model.eval()
        self.num_slots = num_slots
        self.max_len = max_len or model.cfg.max_seq_len
        self.device = next(model.parameters()).device
        self._routing = RoutingRecorder(model)
        self.num_experts = self._routing.num_experts
        self._tokens: dict[int, list[int]] = {}

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> StepOutput:
        assert slot not in self._tokens and 0 <= slot < self.num_slots, f"slot {slot} is busy or out of range"
        self._tokens[slot] = list(ids)
        logits = self.model(torch.tensor([ids], device=self.device)).logits[:, -1].float()  # [1, V]
        experts = self._routing.take()  # [S, K] per layer: one sequence, no padding
        return StepOutput(logits, experts)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> StepOutput:
        for slot, token in zip(slots, tokens):
            self._tokens[slot].append(token)
        rows = [self._tokens[slot] for slot in slots]
        lengths = torch.tensor([len(r) for r in rows])  # [B]
        width = int(lengths.max())
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, W] right-padded
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
        mask = torch.arange(width)[None, :] < lengths[:, None]  # [B, W] real tokens
        last = lengths - 1  # [B] position of each row's newest token
        logits = self.model(ids.to(self.device), mask.to(self.device)).logits  # [B, W, V]
        logits = logits[torch.arange(len(rows), device=logits.device), last.to(logits.device)].float()  # [B, V]
        experts = self._routing.take()  # [B*W, K] per layer
        if experts is not None:
            flat_last = torch.arange(len(rows)) * width + last  # [B] rows of the newest tokens
            experts = [e[flat_last] for e in experts]  # [B, K]
        return StepOutput(logits, experts)

    def release(self, slot: int) -> None:
        self._tokens.pop(slot, None)


class KVCacheBackend:
    """One KV-cache slot per sequence: prefill writes the prompt's keys, decode one token each."""

    def __init__(self, model: nn.Module, num_slots: int, max_len: int | None = None):
        from moekit.layers.kv_cache import KVCache

        self.model = model.eval()
        weight = next(model.parameters())
        self.cache = KVCache(model.cfg, num_slots, max_len, dtype=weight.dtype, device=weight.device)
        self.num_slots, self.max_len, self.device = num_slots, self.cache.max_len, weight.device
        self._routing = RoutingRecorder(model)
        self.num_experts = self._routing.num_experts

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> StepOutput:
        self.cache.reset(slot)
        view = self.cache.view([slot], [len(ids)], len(ids))
        last = torch.tensor([len(ids) - 1], device=self.device)
        out = self.model(torch.tensor([ids], device=self.device), cache=view, logits_at=last)
        self.cache.commit(view)
        return StepOutput(out.logits[:, -1].float(), self._routing.take())  # [1, V], [S, K] per layer

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> StepOutput:
        view = self.cache.view(slots, [1] * len(slots), 1)
        out = self.model(torch.tensor(tokens, device=self.device)[:, None], cache=view)  # [B, 1] -> [B, 1, V]
        self.cache.commit(view)
        return StepOutput(out.logits[:, 0].float(), self._routing.take())  # [B, V], [B, K] per layer

    def release(self, slot: int) -> None:
        self.cache.reset(slot)  # nothing to free: the slot's memory is preallocated and reused


def make_backend(model: nn.Module, num_slots: int, kv_cache: bool = True) -> Backend:
    if kv_cache:
        try:
            return KVCacheBackend(model, num_slots)
        except ImportError:  # TRANSITIONAL: until the generation engine's KV cache is on main
            import sys

            print("moekit serve: note: no KV cache in this build; recomputing contexts", file=sys.stderr)
    return RecomputeBackend(model, num_slots)


__all__ = ["Backend", "StepOutput", "RecomputeBackend", "KVCacheBackend", "make_backend"]
