"""The server's engine loop without HTTP: admission budget, limits, cancellation, a listener
that breaks, and the load telemetry."""

from __future__ import annotations

import threading

import pytest

from moekit.inference.engine import Engine
from moekit.inference.sampling import SamplingParams
from moekit.serve.scheduler import ContextTooLong, QueueFull, Request, Scheduler
from serve_helpers import tiny_model


class Letters:
    """A tokenizer's detokenizer side, one letter per token: the scheduler is under test, not text."""

    def detokenizer(self, prompt_ids=()):
        return self

    def push(self, token_id):
        return chr(65 + token_id % 26)

    def flush(self):
        return ""


def scheduler(max_batch: int, **kw) -> Scheduler:
    return Scheduler(Engine(tiny_model(64), Letters(), max_batch=max_batch, record_routing=True), **kw)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


def test_chunked_prefill_lets_the_veteran_decode_every_step():
    """Engine prefill budget 10: a 12-token prompt goes in over two steps, newcomers follow, and
    the first request, once decoding, gets a token at every step meanwhile."""
    sched = Scheduler(Engine(tiny_model(64), Letters(), max_batch=4, record_routing=True, prefill_chunk=10))
    reqs = [Request(list(range(1, n + 1)), greedy(6), lambda ev: None) for n in (3, 12, 4, 5)]
    sched.submit(reqs[0])
    sched.step()  # the veteran: prefilled, one token
    for r in reqs[1:]:
        sched.submit(r)
    got = []
    for _ in range(3):
        sched.step()
        got.append([len(r.seq.output_ids) for r in reqs])
    # step 2: 10 of the 12; step 3: its last 2, the 4 and 4 of the 5; step 4: the 5's last one
    assert got == [[2, 0, 0, 0], [3, 1, 1, 0], [4, 2, 2, 1]]
    assert sched.stats.snapshot()["decode_batch_sizes"] == {"1": 2, "3": 1}


def test_limits_raise_before_anything_is_queued():
    sched = scheduler(1, max_waiting=1)
    with pytest.raises(ContextTooLong):
        sched.submit(Request([1] * 90, greedy(10), lambda ev: None))  # context 96
    sched.submit(Request([1, 2], greedy(4), lambda ev: None))
    with pytest.raises(QueueFull):
        sched.submit(Request([3], greedy(4), lambda ev: None))
    assert sched.load()["waiting"] == 1


def test_cancel_frees_the_slot_for_the_next_request():
    sched = scheduler(1)
    long, short = Request([1, 2, 3], greedy(50), lambda ev: None), Request([4, 5], greedy(2), lambda ev: None)
    sched.submit(long)
    sched.submit(short)
    sched.step(), sched.step()
    assert short.seq is None and sched.load()["free_slots"] == 0
    sched.cancel(long)
    sched.step()
    assert long.seq.finish_reason == "cancelled" and short.seq is not None and short.seq.output_ids
    assert sched.load()["cancelled"] == 1


def test_a_listener_that_breaks_cancels_its_request_not_the_engine():
    sched = scheduler(2)
    events, done = [], threading.Event()

    def on_event(ev):
        events.append(ev)
        if ev.kind != "text":
            done.set()

    def broken(ev):
        raise RuntimeError("event loop is closed")

    sched.start()
    try:
        sched.submit(Request([5, 6, 7], greedy(40), broken))
        sched.submit(Request([1, 2, 3], greedy(6), on_event))
        assert done.wait(30)
        assert events[-1].kind == "done" and events[-1].usage["completion_tokens"] == 6
        for _ in range(500):
            if sched.load()["free_slots"] == 2:
                break
            threading.Event().wait(0.02)
        assert sched.load()["cancelled"] == 1 and sched.load()["free_slots"] == 2
    finally:
        sched.stop()


def test_load_counts_every_real_token_once():
    sched = scheduler(2)
    reqs = [Request(list(range(1, 8)), greedy(4), lambda ev: None), Request([9, 10], greedy(3), lambda ev: None)]
    for r in reqs:
        sched.submit(r)
    while sched.load()["running"] or sched.load()["waiting"]:
        sched.step()
    fed = sum(len(r.prompt_ids) + len(r.seq.output_ids) - 1 for r in reqs)  # the last token is never fed back
    snap = sched.stats.snapshot()
    assert snap["tokens"] == fed  # the padded prefill row of the short prompt is not counted
    assert [sum(layer["tokens_per_expert"]) for layer in snap["layers"]] == [fed * 2] * 2  # top-2
