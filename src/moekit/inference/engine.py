"""The generation engine: a slot-based KV cache, batched prefill and decode, per-sequence sampling.

Plan of one ``step()``:
  1. admit: queued sequences take free cache slots (at most ``max_batch`` run at once);
  2. prefill: prompts not yet in the cache are prefilled together in one forward, right-padded,
     logits only at each row's last real token; a row whose whole prompt is in samples its first
     token. With ``prefill_chunk`` set, a step prefills at most that many prompt tokens over all
     rows, so a long prompt goes in over several steps (chunked prefill, as in Sarathi and vLLM)
     while the running sequences keep decoding in between: a newcomer's prompt costs the others
     at most one chunk of latency per token, not the whole prompt;
  3. decode: every sequence that was already decoding feeds its last token, one [B, 1] forward
     over its slots (the MoE layers take their few-token decode path);
  4. each row samples with its own ``SamplingParams`` and generator, detokenizes incrementally,
     and finishes on a stop token, a stop string (text cut right before it), ``max_new_tokens``
     or a full context; a finished sequence's slot is free for the next admit.
``generate`` and ``stream`` are loops over ``step``; a server calls ``add``, ``step`` and
``cancel`` itself (continuous batching: newcomers join at any step, nobody waits for the longest).
A row's result does not depend on the other rows: positions, masks and sampling are per row.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence as Seq

import torch

from moekit.inference.fast_decode import install as fast_decode_install
from moekit.inference.sampling import SamplingParams, make_generator, sample_token
from moekit.layers.kv_cache import KVCache
from moekit.model import MoETransformer

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(eq=False)
class Sequence:
    """One prompt being continued. ``text`` is the detokenized output so far (cut at a stop
    string); ``routing`` (when the engine records it) holds, per generated token, the expert
    ids [MoE layer][K] of the forward position that predicted it."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    routing: list[list[list[int]]] = field(default_factory=list)
    slot: int | None = None
    _generator: torch.Generator | None = field(default=None, repr=False)
    _detok: object | None = field(default=None, repr=False)
    _emitted: int = 0  # characters of ``text`` handed out by take_text
    _cut: bool = False  # text was cut at a stop string: it is final
    _prefilled: int = 0  # prompt tokens already in the KV cache

    @property
    def prefilling(self) -> bool:
        """Part of the prompt is still to go into the cache (no token generated yet)."""
        return self._prefilled < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_text(self) -> str:
        """Text not handed out yet, minus a tail that could still become a stop string."""
        end = len(self.text) if self.finished else len(self.text) - _stop_prefix_len(self.text, self.params.stop)
        piece = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return piece


def _stop_prefix_len(text: str, stops: Seq[str]) -> int:
    """Length of the longest end of ``text`` that is the start of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _stderr(message: str) -> None:  # fast decode's one-off "compiling its kernel" line
    print(message, file=sys.stderr, flush=True)


@dataclass
class EngineStats:
    """Counters for --json output and benchmarks (seconds are wall time of the forwards + sampling)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["prefill_tokens_per_s"] = self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else None
        d["decode_tokens_per_s"] = self.decode_tokens / self.decode_seconds if self.decode_seconds else None
        return d


class Engine:
    """Continues prompts with a model. ``tokenizer`` (``moekit.inference.tokenization.TextTokenizer``,
    from ``load_tokenizer``) is needed for text and stop strings; without it sequences carry ids only."""

    def __init__(self, model: MoETransformer, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 record_routing: bool = False, prefill_chunk: int | None = None, fast_decode: bool = False):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (or None for whole prompts), got {prefill_chunk}")
        p = next(model.parameters())
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled per step over all rows; None = no cap
        with torch.inference_mode():
            self.cache = KVCache(model.cfg, max_batch, max_len, dtype=p.dtype, device=p.device)
        self.max_len = self.cache.max_len
        self.device = p.device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch))
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._routing: dict[int, torch.Tensor] = {}
        self._hooks = self._record_routing() if record_routing else []
        # fast_decode: decode steps use a compiled small-M matmul (inference/fast_decode.py); CPU fp32/bf16
        self._decoding = fast_decode_install(model, log=_stderr).decoding if fast_decode else contextlib.nullcontext

    # -- the server-facing surface -------------------------------------------------------------

    def add(self, prompt_ids: Seq[int], params: SamplingParams | None = None) -> Sequence:
        """Queue a prompt; it is prefilled at the next ``step`` with a free slot."""
        params = params or SamplingParams()
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty (start it with the model's BOS token if it has one)")
        if len(prompt_ids) > self.max_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_len}")
        if bad := [i for i in prompt_ids if not 0 <= i < self.model.cfg.vocab_size]:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.model.cfg.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        seq = Sequence(next(self._ids), prompt_ids, params, _generator=make_generator(params.seed))
        if self.tokenizer is not None:
            seq._detok = self.tokenizer.detokenizer(prompt_ids)
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` now (finish reason "cancelled") and free its slot."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.finished:
            seq.finish_reason = "cancelled"
        self._retire(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Admit newcomers, prefill (a chunk of) the prompts not yet cached, decode one token for
        the others -> sequences that got a token."""
        decoding = [s for s in self.running if not s.prefilling]
        self._admit()
        touched = []
        if prefilling := [s for s in self.running if s.prefilling]:
            touched += self._prefill(prefilling)
        if decoding:
            touched += self._decode(decoding)
        return touched

    # -- loops over step -----------------------------------------------------------------------

    def generate(self, prompts: Iterable[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[Sequence]:
        """Continue every prompt to completion (batched up to ``max_batch`` at a time)."""
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        seqs = [self.add(p, sp) for p, sp in zip(prompts, params, strict=True)]
        while not all(s.finished for s in seqs):
            self.step()
        return seqs

    def stream(self, prompt_ids: Seq[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text pieces of one continuation as they are decoded (``stream(...).seq`` is not
        available; use ``add``/``step``/``take_text`` to keep the Sequence)."""
        seq = self.add(prompt_ids, params)
        try:
            while not seq.finished:
                self.step()
                if piece := seq.take_text():
                    yield piece
            if piece := seq.take_text():
                yield piece
        finally:
            if not seq.finished:
                self.cancel(seq)

    # -- the steps -----------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop(0)
            seq._prefilled = 0
            self.cache.reset(seq.slot)
            self.running.append(seq)

    def _chunks(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        """(sequence, prompt tokens to prefill now), first come first served within the step's
        ``prefill_chunk`` budget; the first row always gets some, so every prompt advances."""
        budget = self.prefill_chunk
        out = []
        for s in seqs:
            n = len(s.prompt_ids) - s._prefilled
            if budget is not None:
                if budget == 0:
                    break
                n = min(n, budget)
                budget -= n
            out.append((s, n))
        return out

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        t0 = time.perf_counter()
        chunks = self._chunks(seqs)
        S = max(n for _, n in chunks)
        # A padded row writes S cache positions from its start: a row whose start + S would run
        # past the cache (a late chunk near the end of the context) goes in a forward of its own.
        fits = [(s, n) for s, n in chunks if self.cache.lengths[s.slot] + S <= self.max_len]
        groups = ([fits] if fits else []) + [[c] for c in chunks if c not in fits]
        done = []
        for group in groups:
            done += self._prefill_forward(group)
        self.stats.prefill_tokens += sum(n for _, n in chunks)
        self.stats.prefill_seconds += time.perf_counter() - t0
        return done

    def _prefill_forward(self, chunks: list[tuple[Sequence, int]]) -> list[Sequence]:
        """One right-padded forward of the chunks; rows whose prompt is then all cached sample."""
        S = max(n for _, n in chunks)
        ids = torch.zeros(len(chunks), S, dtype=torch.long)
        for b, (s, n) in enumerate(chunks):
            ids[b, :n] = torch.tensor(s.prompt_ids[s._prefilled: s._prefilled + n])
        view = self.cache.view([s.slot for s, _ in chunks], [n for _, n in chunks], S)
        last = torch.tensor([n for _, n in chunks], device=self.device) - 1
        logits = self.model(ids.to(self.device), cache=view, logits_at=last).logits[:, 0]  # [B, V]
        self.cache.commit(view)
        for s, n in chunks:
            s._prefilled += n
        rows = [b for b, (s, _) in enumerate(chunks) if not s.prefilling]
        if not rows:
            return []
        routing = self._take_routing([b * S + chunks[b][1] - 1 for b in rows])
        done = [chunks[b][0] for b in rows]
        self._advance(done, logits[rows], routing)
        return done

    def _decode(self, seqs: list[Sequence]) -> list[Sequence]:
        t0 = time.perf_counter()
        live = [s for s in seqs if not s.finished]
        if not live:
            return []
        ids = torch.tensor([[s.output_ids[-1]] for s in live], device=self.device)  # [B, 1]
        view = self.cache.view([s.slot for s in live], [1] * len(live), 1)
        with self._decoding():
            logits = self.model(ids, cache=view).logits[:, -1]  # [B, V]
        self.cache.commit(view)
        self._advance(live, logits, self._take_routing(list(range(len(live)))))
        self.stats.decode_tokens += len(live)
        self.stats.decode_steps += 1
        self.stats.decode_seconds += time.perf_counter() - t0
        return live

    def _advance(self, seqs: list[Sequence], logits_BV: torch.Tensor, routing: list | None) -> None:
        """Sample each row's next token and apply the finishing rules."""
        logits_BV = logits_BV.float().cpu()
        for b, seq in enumerate(seqs):
            p = seq.params
            seen = torch.tensor(seq.prompt_ids + seq.output_ids) if p.repetition_penalty != 1.0 else _NO_IDS
            tok = sample_token(logits_BV[b], p, seen, seq._generator)
            seq.output_ids.append(tok)
            if routing is not None:
                seq.routing.append(routing[b])
            if tok in p.stop_token_ids:
                seq.finish_reason = "stop"
            else:
                self._push_text(seq, tok)
            if not seq.finished and (len(seq.output_ids) >= p.max_new_tokens or self.cache.lengths[seq.slot] >= self.max_len):
                seq.finish_reason = "length"
            if seq.finished:
                self._flush_text(seq)
                self._retire(seq)

    def _push_text(self, seq: Sequence, tok: int) -> None:
        if seq._detok is None:
            return
        before = len(seq.text)
        seq.text += seq._detok.push(tok)
        self._check_stop(seq, before)

    def _flush_text(self, seq: Sequence) -> None:
        if seq._detok is None or seq._cut:
            return
        before = len(seq.text)
        seq.text += seq._detok.flush()
        self._check_stop(seq, before)

    def _check_stop(self, seq: Sequence, before: int) -> None:
        """Cut ``text`` right before the first stop string that the new text completes."""
        stops = seq.params.stop
        if not stops:
            return
        lo = max(0, before - max(len(s) for s in stops) + 1)
        hits = [i for s in stops if (i := seq.text.find(s, lo)) >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
            seq.finish_reason, seq._cut = "stop", True

    def _retire(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
            self.free_slots.sort()  # lowest slots first keeps running rows consecutive (a view, not a gather)

    # -- routing record (--show-routing) -------------------------------------------------------

    def _record_routing(self) -> list:
        hooks = []
        for i, layer in enumerate(self.model.moe_layers()):
            if layer.cfg.router == "expert_choice":
                raise ValueError("routing records need token-choice routers (expert choice picks tokens, not experts)")

            def hook(_module, _inputs, out, i=i):
                self._routing[i] = out.ids
            hooks.append(layer.router.register_forward_hook(hook))
        return hooks

    def _take_routing(self, rows: list[int]) -> list[list[list[int]]] | None:
        """Expert ids [MoE layer][K] at the given token rows of the last forward, per row."""
        if not self._hooks:
            return None
        per_layer = [self._routing[i][rows].tolist() for i in range(len(self._hooks))]  # [layer][row][K]
        return [[per_layer[l][r] for l in range(len(per_layer))] for r in range(len(rows))]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


_NO_IDS = torch.zeros(0, dtype=torch.long)

__all__ = ["Engine", "Sequence", "EngineStats", "FINISH_REASONS"]
