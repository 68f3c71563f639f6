"""Continuous batching for the server: one engine thread drives ``inference.Engine`` for every
request, one token per running sequence per step.

The engine does the model work (inference/engine.py: admit into free KV slots, one batched
prefill of newcomers, one batched decode step of the others, sampling, stop strings). This
file adds what a server needs around it (after Orca, Yu et al. 2022, "iteration-level
scheduling", as in vLLM):
    1. requests arrive from any thread (``submit``) into a bounded queue: over ``max_waiting``
       they are refused (HTTP 429); over the context they are refused (HTTP 400);
    2. before each step, cancelled requests (their clients left) leave the engine, freeing
       their slots, and waiting ones are handed to the engine while slots are free (the engine
       prefills long prompts in chunks, ``Engine(prefill_chunk=...)``, so they share steps too);
    3. after each step, every request that got a token hears its text (and, if asked, the
       experts that produced it); finished ones hear ``done`` with the usage.
So a long request never blocks short ones: it shares each step instead of owning the model.
Events go out through each request's ``on_event``, called on the engine thread.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from moekit.inference.engine import Engine, Sequence
from moekit.inference.sampling import SamplingParams
from moekit.serve.routing import MoEStats, count_experts


class QueueFull(Exception):
    """More requests wait than ``max_waiting`` allows (HTTP 429)."""


class ContextTooLong(ValueError):
    """Prompt plus max_tokens do not fit the model's context (HTTP 400)."""


@dataclass
class Event:
    """What a request hears from the engine: text, then one ``done`` (or ``error``)."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    token_experts: list[list[int]] | None = None  # [MoE layer][K]: the experts that produced this token
    finish_reason: str | None = None  # "stop" | "length" on done
    usage: dict | None = None  # on done


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    want_routing: bool = False  # per-token experts in events and usage.moe at the end
    cancelled: bool = False
    seq: Sequence | None = field(default=None, repr=False)  # the engine's, once admitted
    _reported: int = 0  # output tokens already reported


class Scheduler:
    """The engine loop; at most ``engine.max_batch`` sequences run, ``max_waiting`` wait."""

    def __init__(self, engine: Engine, max_waiting: int = 64):
        self.engine = engine
        self.max_waiting = max_waiting
        self.stats = MoEStats(engine.model)
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # handed to the engine, not finished
        self._by_seq: dict[int, Request] = {}  # engine Sequence id -> its request
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "generated_tokens": 0, "steps": 0}

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    # ---- any thread --------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue ``req``; raises ContextTooLong or QueueFull (nothing queued then)."""
        if not req.prompt_ids:
            raise ValueError("the prompt is empty")
        room = self.max_len - len(req.prompt_ids)
        if room < 1 or req.params.max_new_tokens > room:
            raise ContextTooLong(
                f"the prompt has {len(req.prompt_ids)} tokens and max_tokens is {req.params.max_new_tokens}, "
                f"but the model's context is {self.max_len} tokens")
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests already wait; retry later")
            self._waiting.append(req)
            self._wake.notify()

    def cancel(self, req: Request) -> None:
        """Stop generating for ``req`` (its client left); the loop frees its slot before the next step."""
        with self._wake:
            req.cancelled = True
            self._wake.notify()

    def load(self) -> dict:
        with self._wake:
            running = len(self._active)
            return {"running": running, "waiting": len(self._waiting), "free_slots": self.engine.max_batch - running,
                    "slots": self.engine.max_batch, **self.counters}

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
                while not self._stop and not self._active and not self._waiting:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # a bug must fail the requests in flight, never the server
                traceback.print_exc(file=sys.stderr)
                for req in list(self._active):
                    self._fail(req, "internal error in the engine loop (see the server log)")

    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones, one engine step, report and retire."""
        self._drop_cancelled()
        self._admit()
        if not self._active:
            return
        decode_batch = sum(1 for r in self._active if not r.seq.prefilling)  # the veterans decode together
        touched = self.engine.step()
        self.stats.count_step(decode_batch)
        self.counters["steps"] += 1
        for seq in touched:
            self._report(self._by_seq[seq.id])

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [r for r in self._waiting if r.cancelled]
            for req in gone:
                self._waiting.remove(req)
            live = [r for r in self._active if r.cancelled]
        for req in live:
            self.engine.cancel(req.seq)  # frees its KV slot
            self._forget(req)
        self.counters["cancelled"] += len(gone) + len(live)

    def _admit(self) -> None:
        """Hand waiting requests to the engine while it has free slots."""
        with self._wake:
            while self._waiting and len(self._active) < self.engine.max_batch:
                req = self._waiting.popleft()
                try:
                    req.seq = self.engine.add(req.prompt_ids, req.params)
                except ValueError as e:  # the engine's own checks (vocabulary, stop strings)
                    self._emit(req, Event("error", text=str(e)))
                    self.counters["failed"] += 1
                    continue
                self._by_seq[req.seq.id] = req
                self._active.append(req)

    def _report(self, req: Request) -> None:
        """Tell ``req`` about the token(s) it got this step, and ``done`` when it finished."""
        seq = req.seq
        new = len(seq.output_ids) - req._reported
        req._reported = len(seq.output_ids)
        self.counters["generated_tokens"] += new
        piece = seq.take_text()
        if req.want_routing and seq.routing:
            self._emit(req, Event("text", piece, seq.routing[-1]))
        elif piece:
            self._emit(req, Event("text", piece))
        if seq.finished:
            self._emit(req, Event("done", finish_reason=seq.finish_reason, usage=self._usage(req)))
            self.counters["completed"] += 1
            self._forget(req)

    def _usage(self, req: Request) -> dict:
        n_prompt, n_out = len(req.prompt_ids), len(req.seq.output_ids)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        if req.want_routing:
            usage["moe"] = {"tokens_per_expert": count_experts(req.seq.routing, self.stats.num_experts)}
        return usage

    def _emit(self, req: Request, event: Event) -> None:
        """Deliver an event; a listener that is gone (its event loop closed) cancels the request
        instead of taking the engine down."""
        try:
            req.on_event(event)
        except Exception as e:
            print(f"moekit serve: cannot deliver a request's output ({e}); cancelling it", file=sys.stderr)
            req.cancelled = True

    def _fail(self, req: Request, message: str) -> None:
        self._emit(req, Event("error", text=message))
        self.counters["failed"] += 1
        if req.seq is not None:
            self.engine.cancel(req.seq)
        self._forget(req)

    def _forget(self, req: Request) -> None:
        if req in self._active:
            self._active.remove(req)
        if req.seq is not None:
            self._by_seq.pop(req.seq.id, None)


__all__ = ["Scheduler", "Request", "Event", "QueueFull", "ContextTooLong"]
