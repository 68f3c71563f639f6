"""``moekit bench generate``: prefill and decode tokens/s of the engine against transformers' generate.

Plan:
  1. Build a Mixtral-shaped random MoE (scaled down to a few hundred M parameters), export it
     with save_pretrained, and load the same weights into moekit and into transformers.
  2. Per dtype and batch size, time interleaved repeats of: the engine generating N tokens
     after P-token prompts (its own prefill and decode clocks), and transformers' generate for
     1 token (prefill) and for N tokens (decode = the difference over N - 1 steps). Medians.
     With --fast-decode the engine also runs with ``inference/fast_decode.py`` in the same
     interleaving (its kernel compiled in the warm-up, outside the clocks).
  3. Measure the machine's copy bandwidth (a large tensor copy, read + write bytes) and turn
     batch-1 decode into a fraction of the bandwidth bound: bytes a decode step must read
     (active weights + the KV cache at the mean context) / bandwidth = the fastest possible step.
  4. Peak memory of the engine in a fresh process (peak RSS over its RSS before loading the
     model) against weights + KV cache.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from moekit.accounting import count_params, kv_cache_bytes_per_token
from moekit.config import ModelConfig, MoEConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_config(quick: bool) -> ModelConfig:
    """Mixtral's shape (8 experts, top-2, GQA 4:1, SwiGLU) scaled down: ~390M parameters, ~130M
    active; quick: ~50M for a smoke run."""
    d, f, layers, vocab = (1024, 1536, 8, 32000) if not quick else (512, 768, 4, 8000)
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=d // 64, n_kv_heads=d // 256,
                       d_ff=f, max_seq_len=1024, rope_theta=1e6,
                       moe=MoEConfig(d_model=d, d_expert=f, num_experts=8, top_k=2))


def active_weight_bytes(cfg: ModelConfig, bytes_per_param: int) -> int:
    """Weights one batch-1 decode step reads: the active parameters minus the embedding table
    (one row of it is read, not all)."""
    pc = count_params(cfg)
    return (pc.active - pc.active_breakdown["embeddings"]) * bytes_per_param


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy, counting the read and the write (the STREAM convention)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:])


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Timing:
    prefill_tps: float  # prompt tokens per second (all rows)
    decode_tps: float  # generated tokens per second (all rows), prefill excluded


def time_moekit(model, prompts: list[list[int]], new_tokens: int, fast_decode: bool = False,
                prefill_chunk: int | None = None) -> Timing:
    from moekit.inference.engine import Engine
    from moekit.inference.sampling import SamplingParams

    # Whole-prompt prefill, like transformers' generate: every row then decodes in lockstep, so
    # "batch 8 decode" is eight rows in every step (chunks would stagger their starts).
    engine = Engine(model, max_batch=len(prompts), max_len=len(prompts[0]) + new_tokens, fast_decode=fast_decode,
                    prefill_chunk=prefill_chunk)
    engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0))
    st = engine.stats
    return Timing(st.prefill_tokens / st.prefill_seconds, st.decode_tokens / st.decode_seconds)


@torch.inference_mode()
def time_hf(model, prompts: list[list[int]], new_tokens: int) -> Timing:
    ids = torch.tensor(prompts)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0,
              min_new_tokens=None)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kw)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, **kw)
    t2 = time.perf_counter()
    prefill = t1 - t0
    decode = max((t2 - t1) - prefill, 1e-9)
    B, P = ids.shape
    return Timing(B * P / prefill, B * (new_tokens - 1) / decode)


def run_case(mk, hf, cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int,
             fast_decode: bool = False) -> dict:
    """Interleaved repeats (moekit, [moekit with fast decode,] transformers, moekit, ...) on the
    same prompts; medians."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    runs = {"moekit": [], "moekit_fast": [], "transformers": []}
    time_moekit(mk, prompts, 2)  # warm-up: first-call allocations and kernel selection
    if fast_decode:
        time_moekit(mk, prompts, 2, fast_decode=True)  # and the kernel's compilation
    if hf is not None:
        time_hf(hf, prompts, 2)
    for _ in range(repeats):
        runs["moekit"].append(time_moekit(mk, prompts, new_tokens))
        if fast_decode:
            runs["moekit_fast"].append(time_moekit(mk, prompts, new_tokens, fast_decode=True))
        if hf is not None:
            runs["transformers"].append(time_hf(hf, prompts, new_tokens))
    out = {}
    for name, ts in runs.items():
        if ts:
            out[name] = dict(prefill_tps=statistics.median(t.prefill_tps for t in ts),
                             decode_tps=statistics.median(t.decode_tps for t in ts))
    return out


def peak_memory(folder: str, cfg: ModelConfig, dtype: str, batch: int, prompt_len: int, new_tokens: int,
                prefill_chunk: int | None = None) -> dict:
    """Peak RSS of a fresh process while the engine generates, over that process's RSS before
    the model was loaded (Python and torch themselves excluded), against weights + KV cache;
    ``load_peak``: the same during from_pretrained, reported apart. ``prefill_chunk``: prompt
    tokens per prefill forward (None: whole prompts, as the timed runs)."""
    import json
    import subprocess
    import sys

    code = (f"from moekit.bench.generate import _peak_child; _peak_child({folder!r}, {dtype!r}, {batch}, "
            f"{prompt_len}, {new_tokens}, {prefill_chunk!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return dict(peak=None, error=out.stderr.strip().splitlines()[-1:])
    m = json.loads(out.stdout.strip().splitlines()[-1])
    m["kv"] = int(kv_cache_bytes_per_token(cfg, DTYPES[dtype].itemsize) * batch * (prompt_len + new_tokens))
    m["overhead"] = m["peak"] / (m["weights"] + m["kv"]) - 1
    return m


def _peak_child(folder: str, dtype: str, batch: int, prompt_len: int, new_tokens: int,
                prefill_chunk: int | None = None) -> None:
    import json

    import moekit

    base = _rss_bytes("VmRSS")
    model = moekit.from_pretrained(folder, dtype=DTYPES[dtype]).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    load_peak = _rss_bytes("VmHWM") - base
    try:  # glibc keeps the loader's freed buffers; hand them back so RSS shows what is in use
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    after_load = _rss_bytes("VmRSS") - base
    with open("/proc/self/clear_refs", "w") as f:  # Linux: resets VmHWM to the current RSS
        f.write("5")
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len)).tolist()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    time_moekit(model, prompts, new_tokens, prefill_chunk=prefill_chunk)
    print(json.dumps(dict(weights=weights, peak=_rss_bytes("VmHWM") - base, load_peak=load_peak,
                          after_load=after_load, forwards=len(forwards))))


def bandwidth_bound_tps(cfg: ModelConfig, dtype_bytes: int, context: float, bandwidth: float) -> float:
    """Batch-1 decode tokens/s if every step only read its active weights and KV once at ``bandwidth``."""
    step_bytes = active_weight_bytes(cfg, dtype_bytes) + kv_cache_bytes_per_token(cfg, dtype_bytes) * context
    return bandwidth / step_bytes


def decode_step_bytes(cfg: ModelConfig, batch: int, context: float, bytes_per_param: int) -> float:
    """Bytes one decode step of ``batch`` sequences at ``context`` cached tokens each must read:
    every non-embedding weight that is not a routed expert, the routed experts that at least one
    of the batch's tokens picks, and each row's KV cache. With uniform routing a token leaves an
    expert out with probability 1 - K/E, so batch tokens touch a fraction 1 - (1 - K/E)^batch of
    them (K/E at batch 1: ``active_weight_bytes``; 99% of 8 experts top-2 at batch 16)."""
    pc = count_params(cfg)
    routed = pc.breakdown.get("routed_experts", 0)
    # One row of the embedding table is read, not all of it (unless it is also the LM head).
    dense = pc.total - routed - (0 if cfg.tie_embeddings else pc.breakdown["embeddings"])
    touched = 1 - (1 - cfg.moe.top_k / cfg.moe.num_experts) ** batch if routed else 0.0
    kv = kv_cache_bytes_per_token(cfg, bytes_per_param) * context * batch
    return (dense + routed * touched) * bytes_per_param + kv


def batching_ceiling(cfg: ModelConfig, batch: int, context: float, bytes_per_param: int) -> float:
    """The most decode tokens/s that ``batch`` sequences per step can give over one at a time
    when a step costs the bytes it reads: batch * bytes(1) / bytes(batch). A dense model reads
    the same weights at any batch; a MoE reads more experts as the batch grows."""
    one = decode_step_bytes(cfg, 1, context, bytes_per_param)
    return batch * one / decode_step_bytes(cfg, batch, context, bytes_per_param)


def export_and_load(cfg: ModelConfig, dtype: torch.dtype, folder: str, with_hf: bool):
    """(moekit model, transformers model or None) on the same weights, in ``dtype``."""
    import moekit

    mk = moekit.from_pretrained(folder, dtype=dtype).eval()
    hf = None
    if with_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return mk, hf


def build_export(cfg: ModelConfig, folder: str) -> None:
    from moekit.model import MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(cfg)
    model.save_pretrained(folder, architecture="MixtralForCausalLM")
    del model


def fmt_row(dtype: str, batch: int, res: dict) -> str:
    mk, fast, hf = res["moekit"], res.get("moekit_fast"), res.get("transformers")
    cells = [f"{dtype:<5}", f"{batch:>5}", f"{mk['prefill_tps']:>10,.0f}", f"{mk['decode_tps']:>9,.1f}"]
    if fast:
        cells.append(f"{fast['decode_tps']:>9,.1f}")
    if hf:
        cells += [f"{hf['prefill_tps']:>10,.0f}", f"{hf['decode_tps']:>9,.1f}",
                  f"{mk['prefill_tps'] / hf['prefill_tps']:>6.2f}x", f"{mk['decode_tps'] / hf['decode_tps']:>6.2f}x"]
        if fast:
            cells.append(f"{fast['decode_tps'] / hf['decode_tps']:>6.2f}x")
    return " ".join(cells)


HEADER = (f"{'dtype':<5} {'batch':>5} {'mk pre/s':>10} {'mk dec/s':>9} {'hf pre/s':>10} {'hf dec/s':>9} "
          f"{'pre':>7} {'dec':>7}")
# with --fast-decode: the fast engine's decode tokens/s and its ratio to transformers' (fd dec)
HEADER_FAST = (f"{'dtype':<5} {'batch':>5} {'mk pre/s':>10} {'mk dec/s':>9} {'fd dec/s':>9} {'hf pre/s':>10} "
               f"{'hf dec/s':>9} {'pre':>7} {'dec':>7} {'fd dec':>7}")


def tmpdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="moekit-bench-generate-")


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# -- the command -------------------------------------------------------------------------------

QUICK = dict(prompt_len=32, new_tokens=8, repeats=3, dtypes="fp32", batches="1,8")


def cmd_bench_generate(args) -> int:
    from moekit.bench.cli import _choices
    from moekit.errors import UsageError

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    dtypes = _choices(args.dtypes, DTYPES, "--dtypes")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batches must be a comma list of integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise UsageError("--batches >= 1, --prompt-len >= 1, --new-tokens >= 2 and --repeats >= 1 are required")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return _run(args, dtypes, batches)


def _run(args, dtypes: list[str], batches: list[int]) -> int:
    from moekit.bench.cli import _cpu_name, _version
    from moekit.fileio import atomic_write_json

    cfg = bench_config(args.quick)
    pc = count_params(cfg)
    load_start = os.getloadavg()
    bandwidth = copy_bandwidth()  # measured again at the end; the better of the two is the bound
    print(f"model: Mixtral-shaped, {pc.total / 1e6:.0f}M parameters, {pc.active / 1e6:.0f}M active; "
          f"prompts {args.prompt_len}, {args.new_tokens} new tokens, greedy; load avg {load_start[0]:.1f} "
          f"on {os.cpu_count()} CPUs; copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows, memory = [], {}
    fast = getattr(args, "fast_decode", False)
    with tmpdir() as folder:
        build_export(cfg, folder)
        for dtype in dtypes:
            mk, hf = export_and_load(cfg, DTYPES[dtype], folder, not args.no_hf)
            if dtype == dtypes[0]:
                print(HEADER_FAST if fast else HEADER, flush=True)
            for batch in batches:
                res = run_case(mk, hf, cfg, batch, args.prompt_len, args.new_tokens, args.repeats, fast)
                print(fmt_row(dtype, batch, res), flush=True)
                rows.append(dict(dtype=dtype, batch=batch, **res))
            del mk, hf
            memory[dtype] = peak_memory(folder, cfg, dtype, max(batches), args.prompt_len, args.new_tokens)
            if args.memory_prefill_chunk:
                memory[dtype]["chunked"] = peak_memory(folder, cfg, dtype, max(batches), args.prompt_len,
                                                       args.new_tokens, args.memory_prefill_chunk)
    bandwidth = max(bandwidth, copy_bandwidth())
    summary = _summary(cfg, rows, memory, bandwidth, args)
    for line in summary["lines"]:
        print(line)
    meta = {"torch": torch.__version__, "transformers": _version("transformers"), "threads": torch.get_num_threads(),
            "machine": _cpu_name(), "cpus": os.cpu_count(), "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(), "args": {k: v for k, v in vars(args).items() if k != "func"}}
    atomic_write_json(args.json_path, dict(meta=meta, config=cfg.to_dict(), rows=rows, memory=memory,
                                                  copy_bandwidth=bandwidth, targets=summary["targets"]))
    print(f"\nwrote {args.json_path}")
    return 0


def _summary(cfg: ModelConfig, rows: list[dict], memory: dict, bandwidth: float, args) -> dict:
    """The issue's targets, each with the figure it is judged on."""
    lines, targets = [""], {}
    context = args.prompt_len + args.new_tokens / 2
    for dtype in {r["dtype"] for r in rows}:
        size = DTYPES[dtype].itemsize
        by_batch = {r["batch"]: r for r in rows if r["dtype"] == dtype}
        t = {}
        if 1 in by_batch:
            mk1 = by_batch[1]["moekit"]["decode_tps"]
            bound = bandwidth_bound_tps(cfg, size, context, bandwidth)
            t["decode_b1_fraction_of_bandwidth_bound"] = mk1 / bound
            lines.append(f"{dtype}: batch-1 decode {mk1:.1f} tok/s = {100 * mk1 / bound:.0f}% of the bandwidth bound "
                         f"{bound:.1f} tok/s ({human_bytes(active_weight_bytes(cfg, size))} active weights per token)")
            if "transformers" in by_batch[1]:
                t["decode_b1_vs_transformers"] = mk1 / by_batch[1]["transformers"]["decode_tps"]
            if fast1 := by_batch[1].get("moekit_fast", {}).get("decode_tps"):
                t["fast_decode_b1_fraction_of_bandwidth_bound"] = fast1 / bound
                lines.append(f"{dtype}: batch-1 decode with --fast-decode {fast1:.1f} tok/s = {100 * fast1 / bound:.0f}% "
                             f"of the bound ({fast1 / mk1:.2f}x the plain engine)")
                if "transformers" in by_batch[1]:
                    t["fast_decode_b1_vs_transformers"] = fast1 / by_batch[1]["transformers"]["decode_tps"]
        if 1 in by_batch and 8 in by_batch:
            t["decode_b8_vs_b1"] = by_batch[8]["moekit"]["decode_tps"] / by_batch[1]["moekit"]["decode_tps"]
        pre = [r["moekit"]["prefill_tps"] / r["transformers"]["prefill_tps"] for r in by_batch.values() if "transformers" in r]
        if pre:
            t["prefill_vs_transformers_min"] = min(pre)
        m = memory.get(dtype, {})
        if m.get("peak") is not None:
            t["peak_memory_overhead"] = m["overhead"]
            lines.append(f"{dtype}: generation peak {human_bytes(m['peak'])} vs weights {human_bytes(m['weights'])} + KV "
                         f"{human_bytes(m['kv'])}: {100 * m['overhead']:+.0f}% (loading peaked at "
                         f"{human_bytes(m['load_peak'])})")
        chunked = m.get("chunked", {})
        if chunked.get("peak") is not None:
            t["peak_memory_overhead_chunked"] = chunked["overhead"]
            lines.append(f"{dtype}: with --prefill-chunk {args.memory_prefill_chunk}: peak "
                         f"{human_bytes(chunked['peak'])}: {100 * chunked['overhead']:+.0f}%")
        targets[dtype] = t
        goals = dict(decode_b1_vs_transformers=2.0, decode_b1_fraction_of_bandwidth_bound=0.5,
                     fast_decode_b1_vs_transformers=2.0, fast_decode_b1_fraction_of_bandwidth_bound=0.5,
                     decode_b8_vs_b1=4.0, prefill_vs_transformers_min=2.0)
        for k, goal in goals.items():
            if k in t:
                lines.append(f"  {k} {t[k]:.2f} (target >= {goal}): {'met' if t[k] >= goal else 'NOT met'}")
        for k in ("peak_memory_overhead", "peak_memory_overhead_chunked"):
            if k in t:
                lines.append(f"  {k} {t[k]:.2f} (target < 0.10): {'met' if t[k] < 0.10 else 'NOT met'}")
    return dict(lines=lines, targets=targets)


__all__ = ["bench_config", "copy_bandwidth", "run_case", "peak_memory", "bandwidth_bound_tps",
           "decode_step_bytes", "batching_ceiling", "export_and_load",
           "build_export", "fmt_row", "HEADER", "HEADER_FAST", "DTYPES", "cmd_bench_generate"]
