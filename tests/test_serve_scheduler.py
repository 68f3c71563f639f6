"""The engine loop without HTTP: admission budget, limits, and a listener that breaks."""

from __future__ import annotations

import threading

import pytest

from moekit.serve.backend import RecomputeBackend
from moekit.serve.scheduler import ContextTooLong, QueueFull, Request, SamplingParams, Scheduler
from serve_helpers import tiny_model


class detok:
    """One letter per token: the scheduler is under test here, not text."""

    def push(self, token_id):
        return chr(65 + token_id % 26)

    def flush(self):
        return ""


def collector():
    events, done = [], threading.Event()

    def on_event(ev):
        events.append(ev)
        if ev.kind != "text":
            done.set()
    return events, done, on_event


def test_prefill_budget_admits_one_long_prompt_alone_then_the_rest():
    sched = Scheduler(RecomputeBackend(tiny_model(64), 4), max_prefill_tokens=10)
    reqs = [Request(list(range(1, n + 1)), SamplingParams(max_tokens=3, temperature=0), lambda ev: None, detok())
            for n in (12, 4, 5, 3)]
    for r in reqs:
        sched.submit(r)
    sched.step()
    assert [r.slot >= 0 for r in reqs] == [True, False, False, False]  # over budget, but first goes alone
    sched.step()
    assert [r.slot >= 0 for r in reqs] == [True, True, True, False]  # 4 + 5 fit, 3 more would not
    assert [len(r.generated) for r in reqs[:3]] == [2, 1, 1]  # the veteran decoded while they prefilled


def test_limits_raise_before_anything_is_queued():
    sched = Scheduler(RecomputeBackend(tiny_model(64), 1), max_waiting=1)
    ok = Request([1, 2], SamplingParams(max_tokens=4), lambda ev: None, detok())
    with pytest.raises(ContextTooLong):
        sched.submit(Request([1] * 90, SamplingParams(max_tokens=10), lambda ev: None, detok()))  # context 96
    sched.submit(ok)
    with pytest.raises(QueueFull):
        sched.submit(Request([3], SamplingParams(max_tokens=4), lambda ev: None, detok()))
    assert sched.load()["waiting"] == 1


def test_a_listener_that_breaks_cancels_its_request_not_the_engine():
    sched = Scheduler(RecomputeBackend(tiny_model(64), 2))

    def broken(ev):
        raise RuntimeError("event loop is closed")

    events, done, on_event = collector()
    sched.start()
    try:
        sched.submit(Request([5, 6, 7], SamplingParams(max_tokens=40, temperature=0), broken, detok()))
        sched.submit(Request([1, 2, 3], SamplingParams(max_tokens=6, temperature=0), on_event, detok()))
        assert done.wait(30)
        assert events[-1].kind == "done" and events[-1].usage["completion_tokens"] >= 1
        for _ in range(200):
            if sched.load()["free_slots"] == 2:
                break
            threading.Event().wait(0.02)
        assert sched.load()["cancelled"] == 1 and sched.load()["free_slots"] == 2
    finally:
        sched.stop()
