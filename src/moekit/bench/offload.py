"""``moekit bench offload``: batch-1 decode with offloaded experts against all experts in memory,
on a random MoE whose experts are several times the cache budget.

Plan:
  1. Write a random MoE to a temporary folder: its non-expert weights (one safetensors file)
     and its experts as an expert store, one layer at a time, so this process never holds
     more than one layer's experts.
  2. Alternate fresh child processes (so each peak RSS is one run's own): ``memory`` reads
     every expert into RAM; ``offload`` attaches the store behind an expert cache of
     ``--budget-gb`` (``moekit.offload``). Each prefills the same random prompt, decodes
     ``--new-tokens`` by sampling at temperature 1 with a fixed seed (greedy decoding of a
     random model repeats one token, which one cache slot would serve), and reports decode tokens/s, its RSS before loading and its
     peak RSS, the cache counters over the decode steps, and the routing of every forward.
  3. Medians over ``--repeats``; the offloaded peak RSS (over the RSS before loading) against
     budget + non-expert weights + KV cache (+10 %); the measured decode hit rate against the
     replay of the same routing through the same policy and capacity (``policies.replay``),
     which is what a planner predicts without prefetch.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.config import ModelConfig, MoEConfig

NON_EXPERT = "non_expert.safetensors"


def bench_config(size_gb: float, quick: bool = False) -> ModelConfig:
    """Mixtral-like blocks (GQA 4:1, SwiGLU, top-2) with as many experts per layer as make
    ``size_gb`` of fp32 experts over 4 layers; quick: a small model for tests."""
    d, f, layers, vocab = (1024, 1536, 4, 8000) if not quick else (64, 128, 2, 256)
    expert_bytes = (2 * f * d + d * f) * 4
    experts = max(4, round(size_gb * 1e9 / (layers * expert_bytes)))
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=max(1, d // 64),
                       n_kv_heads=max(1, d // 256), d_ff=f, max_seq_len=512,
                       moe=MoEConfig(d_model=d, d_expert=f, num_experts=experts, top_k=2))


@torch.no_grad()
def write_random_moe(cfg: ModelConfig, folder: Path, seed: int = 0) -> dict:
    """Non-expert weights + expert store of a random MoE in ``folder``; returns their sizes."""
    from safetensors.torch import save_file

    from moekit.model import MoETransformer
    from moekit.offload.store import ExpertLayout, write_layer, write_manifest

    torch.manual_seed(seed)
    model = _empty_model(cfg)
    non_expert = {n: p for n, p in model.state_dict().items() if ".experts." not in n}
    for name, t in non_expert.items():
        t.copy_(1 + 0.1 * torch.randn_like(t) if "norm" in name else 0.02 * torch.randn_like(t))
    save_file({n: t.contiguous() for n, t in non_expert.items()}, str(folder / NON_EXPERT))
    layouts, counts = {}, {}
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            state = {n: 0.02 * torch.randn(t.shape) for n, t in block.ffn.experts.state_dict().items()}
            write_layer(folder, i, state)
            layouts[i], counts[i] = ExpertLayout.of(state), cfg.moe.num_experts
            del state
    write_manifest(folder, layouts, counts)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert isinstance(model, MoETransformer)
    expert_bytes = sum(l.expert_bytes * counts[i] for i, l in layouts.items())
    return {"non_expert_bytes": sum(t.numel() * t.element_size() for t in non_expert.values()),
            "expert_bytes_total": expert_bytes, "experts_per_layer": cfg.moe.num_experts,
            "expert_bytes": next(iter(layouts.values())).expert_bytes, "moe_layers": len(layouts)}


def _empty_model(cfg: ModelConfig):
    """The model with uninitialized storage: untouched pages, which are not RSS until written."""
    from moekit.model import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(cfg)
    model = model.to_empty(device="cpu")
    for module in model.modules():  # non-persistent buffers (routing counters, the zero aux loss)
        for name, b in module.named_buffers(recurse=False):
            if name not in module.state_dict():
                b.zero_()
    return model.eval()


@dataclass
class ChildArgs:
    folder: str
    mode: str  # memory | offload | offload_noprefetch (the replay's counterpart: same cache, no prefetch)
    budget_gb: float
    policy: str
    prefetch: bool
    prompt_len: int
    new_tokens: int
    threads: int | None
    seed: int = 0


@torch.no_grad()
def child(a: ChildArgs) -> dict:
    """One measured run in this (fresh) process; returns plain data."""
    from safetensors.torch import load_file

    from moekit.inference.engine import Engine
    from moekit.inference.sampling import SamplingParams
    from moekit.offload.runtime import OffloadConfig, offload_model
    from moekit.offload.store import DiskStore

    if a.threads:
        torch.set_num_threads(a.threads)
    folder = Path(a.folder)
    rss_before = _rss("VmRSS")
    cfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = _empty_model(cfg)
    model.load_state_dict(load_file(str(folder / NON_EXPERT)), strict=False)
    rt = None
    if a.mode == "memory":
        _read_all_experts(model, DiskStore(folder))
    else:
        prefetch = a.prefetch and a.mode == "offload"
        rt = offload_model(model, OffloadConfig(cache_gb=a.budget_gb, policy=a.policy, prefetch=prefetch,
                                                store_dir=str(folder), reuse_store=True))
    trace = _record_routing(model)
    gen = torch.Generator().manual_seed(a.seed)
    prompt = torch.randint(0, cfg.vocab_size, (a.prompt_len,), generator=gen).tolist()
    engine = Engine(model, max_batch=1, max_len=a.prompt_len + a.new_tokens)
    seq = engine.add(prompt, SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0, seed=a.seed))
    engine.step()  # the prefill
    prefill_forwards = len(trace[0])
    if rt is not None:
        rt.drain()
        rt.reset_stats()
    while not seq.finished:
        engine.step()
    out = {"mode": a.mode, "decode_tokens_per_s": engine.stats.decode_tokens / engine.stats.decode_seconds,
           "decode_tokens": engine.stats.decode_tokens, "rss_before": rss_before, "peak_rss": _peak_rss(),
           "kv_bytes": engine.cache.nbytes,
           "output_ids": seq.output_ids, "trace": trace, "prefill_forwards": prefill_forwards}
    if rt is not None:
        rt.drain()
        out["offload"] = rt.summary(tokens=engine.stats.decode_tokens)
        rt.close()
    return out


def _read_all_experts(model, store) -> None:
    for i, block in enumerate(model.blocks):
        if not block.is_moe:
            continue
        layout = store.layouts[i]
        slot = torch.empty(layout.slot_bytes, dtype=torch.uint8)
        params = dict(block.ffn.experts.named_parameters())
        for e in range(store.num_experts[i]):
            store.read_into(i, e, slot)
            for name, t in layout.views(slot).items():
                params[name][e].copy_(t[0])


def _record_routing(model) -> list[list[list[int]]]:
    """Per MoE layer, per forward, the expert ids its router chose ([T*K] flattened, in order)."""
    trace: list[list[list[int]]] = []
    for layer in model.moe_layers():
        trace.append(rec := [])
        layer.router.register_forward_hook(lambda _m, _a, r, rec=rec: rec.append(r.ids.flatten().tolist()))
    return trace


def cache_accesses(forward_ids: list[int], top_k: int) -> list[int]:
    """The order an offloaded layer asks its cache for experts in one forward: the K routed
    experts in router order for one token; each routed expert once, by id, for more."""
    if len(forward_ids) == top_k:
        return forward_ids
    return sorted(set(forward_ids))


def predicted_hits(trace_layer: list[list[int]], prefill_forwards: int, policy: str, capacity: int, top_k: int):
    """Replay one layer's routing through the policy: warm it with the prefill's accesses,
    then count the decode forwards' hits -> (hits, accesses)."""
    from moekit.offload.policies import make_policy, replay

    p = make_policy(policy)
    warm = [e for ids in trace_layer[:prefill_forwards] for e in cache_accesses(ids, top_k)]
    replay(p, capacity, warm)
    decode = [e for ids in trace_layer[prefill_forwards:] for e in cache_accesses(ids, top_k)]
    r = replay(p, capacity, decode)
    return r.hits, r.hits + r.misses


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    return _rss("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(a: ChildArgs, timeout: float = 1800) -> dict:
    cmd = [sys.executable, "-m", "moekit.bench.offload", json.dumps(a.__dict__)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"bench child ({a.mode}) failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(folder: Path, sizes: dict, budget_gb: float, policy: str, prefetch: bool, prompt_len: int,
        new_tokens: int, repeats: int, threads: int | None, progress=print) -> dict:
    """Interleaved repeats of memory and offload children -> the report (plain data)."""
    modes = ["memory", "offload"] + (["offload_noprefetch"] if prefetch else [])
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            t0 = time.perf_counter()
            runs[mode].append(run_child(ChildArgs(str(folder), mode, budget_gb, policy, prefetch, prompt_len,
                                                  new_tokens, threads)))
            progress(f"  repeat {r + 1}/{repeats} {mode}: {runs[mode][-1]['decode_tokens_per_s']:.2f} tok/s "
                     f"({time.perf_counter() - t0:.0f} s)")
    return summarize(runs, sizes, budget_gb, policy)


def summarize(runs: dict[str, list[dict]], sizes: dict, budget_gb: float, policy: str) -> dict:
    mem, off = runs["memory"], runs["offload"]
    plain = runs.get("offload_noprefetch", off)  # the runs without prefetch, which the replay models
    med = lambda rows, f: statistics.median(f(x) for x in rows)  # noqa: E731
    o = off[0]["offload"]
    cap, top_k = o["slots_per_layer"], 2
    hits = acc = 0
    for layer_trace in plain[0]["trace"]:
        h, n = predicted_hits(layer_trace, plain[0]["prefill_forwards"], policy, cap, top_k)
        hits, acc = hits + h, acc + n
    budget = int(budget_gb * 1e9)
    allowed = budget + sizes["non_expert_bytes"] + off[0]["kv_bytes"]
    # what the process needs beyond weights and KV (allocator, kernels' workspaces, activations),
    # measured on the in-memory runs: peak over start - every weight - KV
    overhead = med(mem, lambda x: x["peak_rss"] - x["rss_before"]) - sizes["non_expert_bytes"] - \
        sizes["expert_bytes_total"] - mem[0]["kv_bytes"]
    return {
        "sizes": sizes, "budget_bytes": budget, "policy": policy, "prefetch": o["prefetch"], "repeats": len(off),
        "slots_per_layer": cap, "same_tokens": all(x["output_ids"] == mem[0]["output_ids"] for x in mem + off),
        "decode_tokens_per_s": {m: med(rows, lambda x: x["decode_tokens_per_s"]) for m, rows in runs.items()},
        "peak_rss_over_start": {m: med(rows, lambda x: x["peak_rss"] - x["rss_before"]) for m, rows in runs.items()},
        "rss_before_load": med(off, lambda x: x["rss_before"]),
        "rss_allowed": allowed, "rss_target": 1.1 * allowed, "runtime_overhead": overhead,
        "hit_rate": med(off, lambda x: x["offload"]["hit_rate"]),
        "hit_rate_no_prefetch": med(plain, lambda x: x["offload"]["hit_rate"]),
        "hit_rate_replay": hits / acc if acc else 0.0,
        "prefetch_accuracy": med(off, lambda x: x["offload"]["prefetch_accuracy"]),
        "bytes_per_token": med(off, lambda x: x["offload"]["bytes_per_token"]),
        "evictions": med(off, lambda x: x["offload"]["evictions"]),
    }


def format_report(rep: dict) -> str:
    s, gb = rep["sizes"], 1e9
    tps, rss = rep["decode_tokens_per_s"], rep["peak_rss_over_start"]
    lines = [
        f"random MoE: {s['moe_layers']} MoE layers x {s['experts_per_layer']} experts of {s['expert_bytes'] / 1e6:.1f} MB "
        f"= {s['expert_bytes_total'] / gb:.2f} GB of experts; non-expert weights {s['non_expert_bytes'] / 1e6:.0f} MB",
        f"expert cache: {rep['budget_bytes'] / gb:.2f} GB = {rep['slots_per_layer']} slots per layer, "
        f"policy {rep['policy']}, prefetch {'on' if rep['prefetch'] else 'off'}; medians of {rep['repeats']} interleaved repeats",
        "decode tokens/s: " + ", ".join(f"{m} {v:.2f} ({v / tps['memory']:.2f}x)" for m, v in tps.items()),
        f"peak RSS over the RSS before loading: " + ", ".join(f"{m} {v / gb:.3f} GB" for m, v in rss.items()),
        f"  offloaded vs budget + non-expert + KV = {rep['rss_allowed'] / gb:.3f} GB (+10 %: {rep['rss_target'] / gb:.3f} GB): "
        f"{'met' if rss['offload'] <= rep['rss_target'] else 'MISSED'}; without the runtime's own overhead "
        f"({rep['runtime_overhead'] / gb:.3f} GB, measured in memory): "
        f"{'met' if rss['offload'] - rep['runtime_overhead'] <= rep['rss_target'] else 'MISSED'}; "
        f"RSS before loading {rep['rss_before_load'] / gb:.2f} GB",
        f"decode hit rate {rep['hit_rate']:.3f} with prefetch {'on' if rep['prefetch'] else 'off'}, "
        f"{rep['hit_rate_no_prefetch']:.3f} without; the replay of the same routing through {rep['policy']} at "
        f"the same capacity predicts {rep['hit_rate_replay']:.3f} without prefetch; prefetch accuracy "
        f"{rep['prefetch_accuracy']:.3f}; {rep['bytes_per_token'] / 1e6:.1f} MB moved per decode token",
        f"sampled tokens (same seed) identical across runs: {rep['same_tokens']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(child(ChildArgs(**json.loads(sys.argv[1])))))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of a large heap
