"""Load test of ``moekit serve``: concurrent streaming clients against a live server on 127.0.0.1.

The server runs in a child process (this script with --serve), so client and server do not
share a GIL; both share the machine's cores, as a local deployment would. For each number
of concurrent clients (default 1, 4, 16, 32) and each mode (``batching``: continuous batching
with --max-batch and chunked prefill of --prefill-chunk tokens per step, as `moekit serve`
runs by default; ``unchunked``: the same with whole-prompt prefill; ``off``: --max-batch 1, one
sequence at a time), every client sends
streaming completions one after another with mixed prompt and output lengths; we report

    output tok/s   completion tokens of all requests / wall time of the level
    TTFT p50/p99   request sent -> first text chunk
    ITL p50/p99    gaps between a stream's successive text chunks (about one token each)
    failed         requests that did not end with [DONE]

and first, in this process, the ceiling at each client count: bytes a decode step of that
batch must read (the experts its tokens touch, the rest of the weights, the KV cache) and the
best ratio over one at a time that gives if a step cost its bytes, next to the ratio the
engine's own decode steps give (no HTTP, no prefill), and both again with the workload's
prompts counted (they cost the same batched or not).

Usage:
    python benchmarks/serve_load.py                      # the table, ~10 minutes on 2 cores
    python benchmarks/serve_load.py --clients 1,16 --requests 2
    python benchmarks/serve_load.py --soak-minutes 10    # + memory across a soak at 16 clients
    python benchmarks/serve_load.py --modes batching,unchunked --clients 16   # chunked prefill's effect
    python benchmarks/serve_load.py --modes engine,batching --no-ceiling     # what HTTP costs
    python benchmarks/serve_load.py --modes batching --clients 16 --prefill-chunk 64   # a chunk size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

from moekit.serve.cli import SERVE_PREFILL_CHUNK

# ---- the server side (child process) ----------------------------------------------------


def build_model(args):
    import torch

    from moekit.config import ModelConfig, MoEConfig
    from moekit.model import MoETransformer

    torch.manual_seed(0)
    # Mixtral-shaped, scaled down so 32 streams fit a 2-core CPU: 8 experts top-2, GQA.
    moe = MoEConfig(d_model=args.d_model, d_expert=args.d_expert, num_experts=8, top_k=2)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=8, n_kv_heads=2,
                      max_seq_len=512, moe=moe)
    return MoETransformer(cfg).eval()


class OneCharPerToken:
    """The tokenizer's part the engine uses. A random model's text is noise; one visible
    character per token makes every token one streamed chunk, so chunk gaps are inter-token
    latencies."""

    def detokenizer(self, prompt_ids=()):
        return self

    def push(self, token_id: int) -> str:
        return chr(33 + token_id % 90)

    def flush(self) -> str:
        return ""


def serve(args) -> None:
    import torch

    from moekit.inference.engine import Engine
    from moekit.serve.app import ServeState
    from moekit.serve.scheduler import Scheduler
    from moekit.serve.server import run

    torch.set_num_threads(args.threads)
    model = build_model(args)
    engine = Engine(model, OneCharPerToken(), max_batch=args.max_batch, prefill_chunk=args.prefill_chunk or None)
    scheduler = Scheduler(engine, max_waiting=256)
    # Prompts arrive as token ids. No stop ids: a random model's EOS would cut outputs short.
    state = ServeState(scheduler, OneCharPerToken(), "bench", model.cfg.vocab_size)
    run(state, "127.0.0.1", args.port, log_level="warning")


# ---- the ceiling: what batching could give on this machine, before any HTTP ---------------


def decode_step_ms(engine, batch: int, context: int, steps: int = 10) -> float:
    """Best wall time of ``steps`` engine decode steps with ``batch`` sequences at ~``context``
    tokens: the fastest is the step's cost on this machine; on a shared CPU the others add
    waits for a descheduled thread (two torch threads on two busy cores: 40 to 800 ms medians
    for a 6 ms step)."""
    import torch

    from moekit.inference.sampling import SamplingParams

    g = torch.Generator().manual_seed(batch)
    seqs = [engine.add(torch.randint(0, engine.model.cfg.vocab_size, (context,), generator=g).tolist(),
                       SamplingParams(max_new_tokens=steps + 3, temperature=0)) for _ in range(batch)]
    while any(s.prefilling for s in seqs):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    for s in seqs:
        engine.cancel(s)
    return 1000 * min(times)


def ceilings(args, levels: list[int]) -> dict:
    """Per client count c (batch b = min(c, --max-batch)): the best throughput ratio over one at a
    time that batching could reach if a decode step cost the bytes it reads (``bytes``: b * bytes
    at batch 1 / bytes at batch b; a MoE reads more experts as b grows), and the ratio this
    engine's own decode steps give (``steps``: b * best step time at 1 / best step time at b);
    both leave prefill and HTTP out. ``+ prefill`` adds the workload's prompts, which cost the
    same in both modes (prefill is compute-bound, batched or not): for the mean request (88
    prompt tokens at the measured prefill speed, 52 outputs at the measured batch-1 step),
    (prompt + outputs) / (prompt + outputs / ceiling). Context: mean prompt + half the output."""
    import torch

    from moekit.bench.generate import batching_ceiling, copy_bandwidth, decode_step_bytes
    from moekit.inference.engine import Engine

    torch.set_num_threads(args.threads)
    model = build_model(args)
    context = 88 + 26  # prompts 16/48/96/192 (mean 88), outputs 16/32/64/96 (mean 52)
    bandwidth = max(copy_bandwidth() for _ in range(3))
    engine = Engine(model, max_batch=max(min(c, args.max_batch) for c in levels))
    one_ms = decode_step_ms(engine, 1, context)
    prompt_ms = prefill_ms_per_token(engine, 128)
    out = {"copy_bandwidth_gb_s": bandwidth / 1e9, "context": context, "prefill_ms_per_token": prompt_ms,
           "levels": {}}
    for c in levels:
        b = min(c, args.max_batch)
        nbytes = decode_step_bytes(model.cfg, b, context, 4)
        step_ms = one_ms if b == 1 else decode_step_ms(engine, b, context)
        # A request's prompt costs the same in both modes (prefill is compute-bound, batched or
        # not); only its outputs get cheaper: Amdahl over the workload's mean request.
        prompt, output = 88 * prompt_ms, 52 * one_ms
        bytes_ceiling = batching_ceiling(model.cfg, b, context, 4)
        out["levels"][c] = {"batch": b, "step_mb": nbytes / 1e6, "floor_ms": 1000 * nbytes / bandwidth,
                            "step_ms": step_ms, "bytes_ceiling": bytes_ceiling, "steps_ceiling": b * one_ms / step_ms,
                            "bytes_prefill_ceiling": (prompt + output) / (prompt + output / bytes_ceiling),
                            "steps_prefill_ceiling": (prompt + output) / (prompt + 52 * step_ms / b)}
    return out


def prefill_ms_per_token(engine, tokens: int, repeats: int = 3) -> float:
    """Best time per prompt token of a ``tokens``-token prompt prefilled in one step."""
    import torch

    from moekit.inference.sampling import SamplingParams

    best = float("inf")
    for r in range(repeats):
        prompt = torch.randint(0, engine.model.cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(r))
        seq = engine.add(prompt.tolist(), SamplingParams(max_new_tokens=2, temperature=0))
        t0 = time.perf_counter()
        while seq.prefilling:
            engine.step()
        best = min(best, time.perf_counter() - t0)
        engine.cancel(seq)
    return 1000 * best / tokens


def fmt_ceiling(c: int, r: dict) -> str:
    return (f"| {c:>3} | {r['batch']:>3} | {r['step_mb']:>6.0f} | {r['floor_ms']:>5.1f} | {r['step_ms']:>6.1f} | "
            f"{r['bytes_ceiling']:>5.1f}x | {r['steps_ceiling']:>5.1f}x | {r['bytes_prefill_ceiling']:>5.1f}x | "
            f"{r['steps_prefill_ceiling']:>5.1f}x |")


# ---- the client side -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, max_batch: int, prefill_chunk: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", "--port", str(port), "--max-batch", str(max_batch),
           "--prefill-chunk", str(prefill_chunk),
           "--threads", str(args.threads), "--d-model", str(args.d_model), "--d-expert", str(args.d_expert),
           "--layers", str(args.layers), "--vocab", str(args.vocab)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up")


async def one_request(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, stamps, tokens, done = time.perf_counter(), [], 0, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    except Exception as e:  # counted as failed
        return {"ok": False, "error": repr(e)}
    ok = done and tokens == max_tokens and bool(stamps)
    return {"ok": ok, "tokens": tokens, "ttft": stamps[0] - sent if stamps else None,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])]}


def workload(rng: random.Random, n: int, vocab: int) -> list[tuple[list[int], int]]:
    """Mixed lengths: prompts of 16-192 tokens, outputs of 16-96 (a long request among short ones)."""
    return [([rng.randrange(vocab) for _ in range(rng.choice((16, 48, 96, 192)))], rng.choice((16, 32, 64, 96)))
            for _ in range(n)]


async def run_level(url: str, clients: int, per_client: int, vocab: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    jobs = [workload(rng, per_client, vocab) for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one_client(mine):
            return [await one_request(client, url, p, m) for p, m in mine]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client(j) for j in jobs)) for r in rs]
        wall = time.perf_counter() - t0
    return summarize(results, clients, wall)


def summarize(results: list[dict], clients: int, wall: float) -> dict:
    good = [r for r in results if r["ok"]]
    itl = sorted(x for r in good for x in r["itl"])
    ttft = sorted(r["ttft"] for r in good)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(good),
            "tokens": sum(r["tokens"] for r in good), "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in good) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "itl_p50": pct(itl, 0.5), "itl_p99": pct(itl, 0.99)}


def run_engine_level(engine, clients: int, per_client: int, vocab: int, seed: int) -> dict:
    """The same clients and requests as ``run_level`` straight into ``engine`` in this process:
    no HTTP, no JSON, no event loop. A token's time is the end of the step that made it."""
    from moekit.inference.sampling import SamplingParams

    rng = random.Random(seed)
    queues = [list(workload(rng, per_client, vocab)) for _ in range(clients)]
    owner, sent, stamps, results = {}, {}, {}, []

    def send(client: int, now: float) -> None:
        prompt, max_tokens = queues[client].pop(0)
        seq = engine.add(prompt, SamplingParams(max_new_tokens=max_tokens, temperature=0))
        owner[seq.id], sent[seq.id], stamps[seq.id] = client, now, []

    t0 = time.perf_counter()
    for c in range(clients):
        send(c, t0)
    while engine.has_work():
        touched = engine.step()
        now = time.perf_counter()
        for seq in touched:
            stamps[seq.id].append(now)
            if seq.finished:
                st = stamps[seq.id]
                results.append({"ok": True, "tokens": len(seq.output_ids), "ttft": st[0] - sent[seq.id],
                                "itl": [b - a for a, b in zip(st, st[1:])]})
                if queues[owner[seq.id]]:
                    send(owner[seq.id], now)
    return summarize(results, clients, time.perf_counter() - t0)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def soak(url: str, pid: int, minutes: float, clients: int, vocab: int) -> list[tuple[float, float]]:
    """Keep ``clients`` streams busy for ``minutes``; sample the server's RSS every 15 s."""
    import httpx

    samples, stop_at, rng = [], time.monotonic() + 60 * minutes, random.Random(1)
    async with httpx.AsyncClient(timeout=600) as client:
        async def loop():
            while time.monotonic() < stop_at:
                (p, m), = workload(rng, 1, vocab)
                await one_request(client, url, p, m)

        async def sampler():
            t0 = time.monotonic()
            while time.monotonic() < stop_at:
                samples.append((time.monotonic() - t0, rss_mb(pid)))
                await asyncio.sleep(15)

        await asyncio.gather(sampler(), *(loop() for _ in range(clients)))
    return samples


def fmt(r: dict, mode: str) -> str:
    return (f"| {mode:<9} | {r['clients']:>3} | {r['requests']:>4} | {r['failed']:>2} | {r['tok_s']:>8.1f} | "
            f"{1000 * r['ttft_p50']:>7.0f} | {1000 * r['ttft_p99']:>7.0f} | {1000 * r['itl_p50']:>6.0f} | "
            f"{1000 * r['itl_p99']:>6.0f} |")


def engine_levels(args, mode: str, max_batch: int, prefill_chunk: int, levels: list[int], record: dict) -> list[str]:
    """The ``engine`` modes: every level's workload straight into an engine in this process."""
    import torch

    from moekit.inference.engine import Engine

    torch.set_num_threads(args.threads)
    engine = Engine(build_model(args), OneCharPerToken(), max_batch=max_batch, prefill_chunk=prefill_chunk or None)
    run_engine_level(engine, 1, 1, args.vocab, seed=99)  # warm-up
    rows = []
    for c in levels:
        engine.stats = type(engine.stats)()
        r = run_engine_level(engine, c, args.requests, args.vocab, seed=c)
        st = engine.stats
        # How many streams a decode step really carried: clients whose requests are short
        # leave early, so a level's tail runs with fewer than ``c``.
        r["mode"], r["mean_decode_batch"] = mode, st.decode_tokens / max(st.decode_steps, 1)
        r["prefill_s"], r["decode_s"] = st.prefill_seconds, st.decode_seconds
        rows.append(fmt(r, mode))
        record["results"].append(r)
        print(rows[-1], f"(load {os.getloadavg()[0]:.1f}; mean decode batch {r['mean_decode_batch']:.1f}, "
              f"prefill {st.prefill_seconds:.1f} s, decode {st.decode_seconds:.1f} s)", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,4,16,32", help="comma list of concurrent client counts (default: 1,4,16,32)")
    p.add_argument("--requests", type=int, default=2, help="requests per client at each level (default: 2)")
    p.add_argument("--max-batch", type=int, default=32, help="the batching server's --max-batch (default: 32)")
    p.add_argument("--modes", default="batching,off",
                   help="comma list of: batching (chunked prefill), unchunked (whole-prompt prefill), "
                        "off (one sequence at a time), engine and engine-off (batching and off without "
                        "HTTP: the same requests straight into an engine in this process) (default: batching,off)")
    p.add_argument("--prefill-chunk", type=int, default=SERVE_PREFILL_CHUNK,
                   help=f"prompt tokens prefilled per step in batching mode (default: {SERVE_PREFILL_CHUNK}, "
                        "as moekit serve; 0 = whole prompts)")
    p.add_argument("--soak-minutes", type=float, default=0, help="then a soak at 16 clients, RSS sampled (default: off)")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads (default: 2)")
    p.add_argument("--d-model", type=int, default=512, help="model width (default: 512)")
    p.add_argument("--d-expert", type=int, default=1024, help="expert FFN width (default: 1024)")
    p.add_argument("--layers", type=int, default=6, help="decoder layers (default: 6)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary (default: 8192)")
    p.add_argument("--no-ceiling", action="store_true",
                   help="skip the ceiling (bytes per decode step and the engine's own step times, ~20 s)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    levels = [int(c) for c in args.clients.split(",")]
    known = {"batching": (args.max_batch, args.prefill_chunk), "unchunked": (args.max_batch, 0), "off": (1, 0),
             "engine": (args.max_batch, args.prefill_chunk), "engine-off": (1, 0)}
    modes = [m.strip() for m in args.modes.split(",")]
    if bad := [m for m in modes if m not in known]:
        p.error(f"unknown mode {bad[0]!r}; choose from {', '.join(known)}")
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows, record = [], {"args": vars(args), "results": []}
    if not args.no_ceiling:
        record["ceiling"] = ceil = ceilings(args, levels)
        print(f"ceiling (fp32, copy bandwidth {ceil['copy_bandwidth_gb_s']:.0f} GB/s, context {ceil['context']}, "
              f"prefill {ceil['prefill_ms_per_token']:.2f} ms per prompt token):")
        print("| clients | batch | MB per decode step | bandwidth floor ms | measured step ms | "
              "bytes ceiling | steps ceiling | bytes + prefill | steps + prefill |")
        for c, r in ceil["levels"].items():
            print(fmt_ceiling(c, r), flush=True)
    for mode in modes:
        if mode.startswith("engine"):
            rows += engine_levels(args, mode, *known[mode], levels, record)
            continue
        proc, url = start_server(args, *known[mode])
        try:
            asyncio.run(run_level(url, 1, 1, args.vocab, seed=99))  # warm-up
            for c in levels:
                r = asyncio.run(run_level(url, c, args.requests, args.vocab, seed=c))
                r["mode"] = mode
                rows.append(fmt(r, mode))
                record["results"].append(r)
                print(rows[-1], f"(load {os.getloadavg()[0]:.1f})", flush=True)
            if args.soak_minutes and mode == "batching":
                samples = asyncio.run(soak(url, proc.pid, args.soak_minutes, 16, args.vocab))
                record["soak_rss_mb"] = samples
                print("soak RSS MB (t s, MB):", [(round(t), round(m, 1)) for t, m in samples], flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print("| mode      | clients | requests | failed | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("\n".join(rows))
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
