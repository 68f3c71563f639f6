"""Continuous batching: one engine thread serves every request, one token per step.

Each step of the loop (after Orca, Yu et al. 2022, "iteration-level scheduling", as in vLLM):
    1. drop cancelled requests (their clients left) and free their slots;
    2. admit waiting requests into free slots, first come first served, while the step's
       prefill budget (``max_prefill_tokens``) lasts; prefill each and sample its first token;
    3. run ONE decode step for every sequence that was already running, all in one batch;
    4. stream each new token's text, and retire sequences that hit EOS, a stop string or
       their token limit, freeing their slots at once for the next step's newcomers.
So a long request never blocks short ones: it shares each step instead of owning the model.

Requests reach the loop through ``submit`` (any thread) and report back through their
``on_event`` callback, called on the engine thread (the server hands it to its event loop).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from moekit.serve.backend import Backend, StepOutput
from moekit.serve.routing import MoEStats, count_experts
from moekit.serve.text import Detokenizer, TextStream


class QueueFull(Exception):
    """More requests wait than ``max_waiting`` allows (HTTP 429)."""


class ContextTooLong(ValueError):
    """Prompt plus max_tokens do not fit the model's context (HTTP 400)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # new tokens at most (EOS and stop strings may end sooner)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2019): smallest set with this mass
    top_k: int | None = None  # sample among the k most likely; None = all
    seed: int | None = None  # the request's own generator: reproducible whatever else runs
    stop: tuple[str, ...] = ()  # text that ends the completion (not included)
    stop_ids: frozenset[int] = frozenset()  # token ids that end it (EOS)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class Event:
    """What a request hears from the engine: text, then one ``done`` (or ``error``)."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    token_experts: list[list[int]] | None = None  # per MoE layer, the K experts that produced this token
    finish_reason: str | None = None  # "stop" | "length" on done
    usage: dict | None = None  # on done


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    detokenizer: Detokenizer
    want_routing: bool = False  # per-token experts in events and usage.moe at the end
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    # engine-side state
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    moe_load: list[list[int]] | None = None  # [L][E] tokens of this request per expert


class Scheduler:
    """The engine loop over a ``Backend`` with ``backend.num_slots`` running sequences at most."""

    def __init__(self, backend: Backend, max_waiting: int = 64, max_prefill_tokens: int | None = None):
        self.backend = backend
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens prefilled per step; None = no cap
        self.stats = MoEStats(backend.num_experts)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._free = list(range(backend.num_slots))[::-1]
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0, "steps": 0}

    # ---- any thread --------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue ``req``; raises ContextTooLong or QueueFull (nothing queued then)."""
        room = self.backend.max_len - len(req.prompt_ids)
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        if room < 1 or req.params.max_tokens > room:
            raise ContextTooLong(
                f"the prompt has {len(req.prompt_ids)} tokens and max_tokens is {req.params.max_tokens}, "
                f"but the model's context is {self.backend.max_len} tokens")
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests already wait; retry later")
            self._waiting.append(req)
            self._wake.notify()

    def cancel(self, req: Request) -> None:
        """Stop generating for ``req`` (its client left); the loop frees its slot next step."""
        with self._wake:
            req.cancelled = True
            self._wake.notify()

    def load(self) -> dict:
        with self._wake:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "free_slots": len(self._free), "slots": self.backend.num_slots, **self.counters}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="moekit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._running and not self._waiting:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # a bug must fail the requests in flight, never the server
                traceback.print_exc(file=sys.stderr)
                for req in list(self._running):
                    self._fail(req, "internal error in the engine loop (see the server log)")

    def step(self) -> None:
        """One iteration: drop cancelled, admit + prefill newcomers, decode the others, retire."""
        self._drop_cancelled()
        veterans = list(self._running)
        for req in self._admit():
            self._prefill(req)
        if veterans:
            self._decode(veterans)
        self.counters["steps"] += 1

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [r for r in self._waiting if r.cancelled]
            for req in gone:
                self._waiting.remove(req)
        for req in gone + [r for r in self._running if r.cancelled]:
            if req.slot >= 0:
                self._retire(req)
            self.counters["cancelled"] += 1

    def _admit(self) -> list[Request]:
        """Waiting requests that get a slot now, within the step's prefill budget."""
        admitted, budget = [], self.max_prefill_tokens
        with self._wake:
            while self._waiting and self._free:
                n = len(self._waiting[0].prompt_ids)
                if admitted and budget is not None and n > budget:
                    break  # the first newcomer always goes: a long prompt must not starve
                req = self._waiting.popleft()
                req.slot = self._free.pop()
                self._running.append(req)
                admitted.append(req)
                budget = None if budget is None else budget - n
        return admitted

    def _prefill(self, req: Request) -> None:
        try:
            req.stream = TextStream(req.detokenizer, req.params.stop)
            seed = req.params.seed if req.params.seed is not None else int.from_bytes(os.urandom(8), "little")
            req.generator = torch.Generator().manual_seed(seed)
            out = self.backend.prefill(req.slot, req.prompt_ids)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            self._fail(req, f"prefill failed: {e}")
            return
        self.stats.add(out.experts)
        if req.want_routing and out.experts is not None:
            req.moe_load = count_experts(out.experts, self.backend.num_experts)
        last = None if out.experts is None else [e[-1].tolist() for e in out.experts]  # [L][K]
        self._advance(req, self._sample(out.logits, [req])[0], last)

    def _decode(self, batch: list[Request]) -> None:
        out: StepOutput = self.backend.decode([r.slot for r in batch], [r.generated[-1] for r in batch])
        self.stats.add(out.experts, decode_batch=len(batch))
        tokens = self._sample(out.logits, batch)
        for b, (req, token) in enumerate(zip(batch, tokens)):
            experts = None if out.experts is None else [e[b].tolist() for e in out.experts]  # [L][K]
            if req.moe_load is not None and experts is not None:
                for load, ids in zip(req.moe_load, experts):
                    for e in ids:
                        load[e] += 1
            self._advance(req, token, experts)

    def _sample(self, logits_BV: torch.Tensor, reqs: list[Request]) -> list[int]:
        return [sample_token(logits_BV[b], r.params, r.generator) for b, r in enumerate(reqs)]

    def _advance(self, req: Request, token: int, experts: list[list[int]] | None) -> None:
        """Take one sampled token: stream its text, and retire the request if it is done."""
        req.generated.append(token)
        self.counters["generated_tokens"] += 1
        p, finish = req.params, None
        if token in p.stop_ids:
            piece, finish = req.stream.finish(), "stop"
        else:
            piece = req.stream.push(token)
            if req.stream.stopped:
                finish = "stop"
            elif len(req.generated) >= p.max_tokens or len(req.prompt_ids) + len(req.generated) >= self.backend.max_len:
                piece, finish = piece + req.stream.finish(), "length"
        if piece or req.want_routing:
            self._emit(req, Event("text", piece, experts if req.want_routing else None))
        if finish is not None:
            self._emit(req, Event("done", finish_reason=finish, usage=self._usage(req)))
            self.counters["completed"] += 1
            self._retire(req)

    def _usage(self, req: Request) -> dict:
        n_prompt, n_out = len(req.prompt_ids), len(req.generated)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        if req.want_routing:
            usage["moe"] = {"tokens_per_expert": req.moe_load or []}
        return usage

    def _emit(self, req: Request, event: Event) -> None:
        """Deliver an event; a listener that is gone (its event loop closed) cancels the request
        instead of taking the engine down."""
        try:
            req.on_event(event)
        except Exception as e:
            print(f"moekit serve: request {req.id}: cannot deliver its output ({e}); cancelling it", file=sys.stderr)
            req.cancelled = True

    def _fail(self, req: Request, message: str) -> None:
        self._emit(req, Event("error", text=message))
        self.counters["failed"] += 1
        self._retire(req)

    def _retire(self, req: Request) -> None:
        if req in self._running:
            self._running.remove(req)
        if req.slot >= 0:
            self.backend.release(req.slot)
            with self._wake:
                self._free.append(req.slot)
            req.slot = -1


def sample_token(logits_V: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """One token id from logits [V]: greedy at temperature 0, else temperature, top-k, top-p."""
    if p.temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / p.temperature
    if p.top_k is not None and p.top_k < logits_V.numel():
        kth = torch.topk(logits_V, p.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs = torch.softmax(logits_V, dim=-1)
    if p.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p >= p.top_p  # mass before a token already reaches top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


__all__ = ["Scheduler", "Request", "SamplingParams", "Event", "QueueFull", "ContextTooLong", "sample_token"]
