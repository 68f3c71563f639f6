"""``moekit serve`` end to end: a real uvicorn server on 127.0.0.1, driven by the official
``openai`` client (and raw httpx where the wire format itself is under test)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from moekit.serve.server import BackgroundServer
from serve_helpers import MODEL, make_state, model_folder

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("tiny-serve"))


@pytest.fixture(scope="module")
def served(folder):
    state = make_state(folder, max_batch=4, max_waiting=16)
    with BackgroundServer(state) as url:
        yield state, url


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def greedy_reference(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    """Full recomputation, one token at a time: the oracle for the server's greedy output."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
    return out


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_health_and_greedy_completion_equals_recompute(served):
    state, url = served
    c = client(url)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    prompt = "the router learns which expert"
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    ids = state.tokenizer.encode(prompt)
    ref = greedy_reference(state.scheduler.engine.model, ids, 12, state.stop_ids)
    assert r.choices[0].text == state.tokenizer.decode(ref)  # decode drops the special (EOS) id
    assert r.choices[0].finish_reason == ("stop" if ref[-1] in state.stop_ids else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref))
    assert r.usage.total_tokens == len(ids) + len(ref)


def test_chat_stream_wire_format_and_usage(served):
    _, url = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Experts route tokens"}], "max_tokens": 10,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "an_unknown_field": 1}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    first, *middle, last, usage, done = events
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["usage"] is None for e in [first, *middle, last])
    assert all(e["choices"][0]["finish_reason"] is None for e in middle)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    assert done == "[DONE]"
    streamed = "".join(e["choices"][0]["delta"]["content"] for e in middle)
    plain = client(url).chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=10, temperature=0)
    assert plain.choices[0].message.content == streamed and plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens == usage["usage"]["completion_tokens"]


def test_openai_client_streams_completions_with_include_usage(served):
    _, url = served
    c = client(url)
    chunks = list(c.completions.create(model=MODEL, prompt="Mixture of experts", max_tokens=9, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    plain = c.completions.create(model=MODEL, prompt="Mixture of experts", max_tokens=9, temperature=0)
    assert plain.choices[0].text == text


def test_stop_string_cuts_exactly_streamed_and_not(served):
    _, url = served
    c = client(url)
    kw = dict(model=MODEL, prompt="Routers pick", temperature=0, max_tokens=24)
    full = c.completions.create(**kw).choices[0].text
    assert len(full) >= 6, full
    stop = full[3:5]  # a stop string that first occurs at or before index 3
    cut = full[: full.find(stop)]
    r = c.completions.create(**kw, stop=[stop, "never-generated"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stop=stop, stream=True))
    assert streamed == cut


def test_concurrent_greedy_requests_equal_one_at_a_time(served):
    state, url = served
    c = client(url)
    prompts = [("The quick", 20), ("Experts route tokens; routers", 5), ("café", 14), ("Mixture of", 9),
               ("lazy dog. The quick brown fox jumps", 17), ("naïve", 3)]

    def ask(p):
        return c.completions.create(model=MODEL, prompt=p[0], max_tokens=p[1], temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    before = dict(state.scheduler.stats.snapshot()["decode_batch_sizes"])
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    after = state.scheduler.stats.snapshot()["decode_batch_sizes"]
    assert any(int(b) > 1 and after[b] > before.get(b, 0) for b in after), after  # they really shared steps


def test_seeded_sampling_is_reproducible_under_load(served):
    _, url = served
    c = client(url)
    kw = dict(model=MODEL, prompt="The lazy", max_tokens=12, temperature=1.0, top_p=0.9, seed=7, extra_body={"top_k": 50})
    alone = c.completions.create(**kw).choices[0].text
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: c.completions.create(**kw).choices[0].text, range(3)))
    assert results == [alone] * 3


def test_moe_usage_and_stats(served):
    state, url = served
    before = state.scheduler.stats.snapshot()
    body = {"model": MODEL, "prompt": "Experts", "max_tokens": 6, "temperature": 0, "moe": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        events = sse_events(r)
    usage = events[-2]["usage"]
    tokens = [e for e in events[:-2] if e["choices"][0]["finish_reason"] is None]
    assert len(tokens) == usage["completion_tokens"]  # one chunk per generated token, with its experts
    k = 2
    for e in tokens:
        experts = e["choices"][0]["moe"]["experts"]
        assert len(experts) == 2 and all(len(set(ids)) == k and all(0 <= i < 4 for i in ids) for ids in experts)
    load = usage["moe"]["tokens_per_expert"]  # [L][E]: the experts that produced each generated token
    assert [sum(layer) for layer in load] == [usage["completion_tokens"] * k] * 2
    assert load[0] == [sum(e["choices"][0]["moe"]["experts"][0].count(x) for e in tokens) for x in range(4)]
    after = httpx.get(url + "/v1/moe/stats").json()
    fed = usage["prompt_tokens"] + usage["completion_tokens"] - 1  # every real token run; the last is never fed
    grown = [sum(a["tokens_per_expert"]) - sum(b["tokens_per_expert"]) for a, b in zip(after["layers"], before["layers"])]
    assert grown == [fed * k] * 2 and after["max_violation"] >= 0


def test_bad_requests_get_openai_errors_and_the_engine_keeps_serving(served):
    state, url = served
    c = client(url)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model=MODEL, prompt="the quick brown fox " * 60, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "tiny-serve", "messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("malformed JSON")
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError, match="image_url"):
        c.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    r = httpx.post(url + "/v1/completions", json={"model": MODEL}, timeout=30)  # no prompt
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing-here").json()["error"]["type"] == "not_found_error"
    ok = c.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1 and state.scheduler.load()["failed"] == 0


def test_client_disconnect_cancels_and_frees_the_slot(served):
    state, url = served
    before = state.scheduler.load()
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 80, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # a few tokens, then hang up
    assert any(g.startswith("data: ") for g in got)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = state.scheduler.load()
        if now["cancelled"] > before["cancelled"] and now["free_slots"] == now["slots"]:
            break
        time.sleep(0.05)
    assert now["cancelled"] == before["cancelled"] + 1 and now["running"] == 0 and now["free_slots"] == now["slots"]
    assert now["generated_tokens"] - before["generated_tokens"] < 80  # it stopped, it did not run to the end


def test_page_is_served_and_uses_the_endpoints(served):
    _, url = served
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for needed in ("/v1/chat/completions", "/v1/models", "stream", '"moe"', "getReader"):
        assert needed in r.text, needed


def test_api_key_is_required_when_set(folder):
    state = make_state(folder, max_batch=1, api_key="s3cret")
    with BackgroundServer(state) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = client(url, "s3cret").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert ok.usage.completion_tokens >= 1
        assert httpx.get(url + "/health").status_code == 200  # liveness stays open


def test_burst_over_the_limit_gets_429_and_the_server_keeps_serving(folder):
    state = make_state(folder, max_batch=1, max_waiting=2)
    with BackgroundServer(state) as url:
        c = client(url)

        def ask(i):
            try:
                return c.completions.create(model=MODEL, prompt=f"The quick {i}", max_tokens=24, temperature=0)
            except openai.RateLimitError as e:
                return e

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(ask, range(10)))
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        served_ok = [r for r in results if not isinstance(r, Exception)]
        assert limited and len(served_ok) >= 3 and len(limited) + len(served_ok) == 10
        assert all(e.status_code == 429 and e.body["type"] == "rate_limit_error" for e in limited)
        assert c.completions.create(model=MODEL, prompt="again", max_tokens=3).usage.completion_tokens >= 1
        assert state.scheduler.load()["failed"] == 0
