"""``moekit trace`` and ``moekit plan-offload``: parsers and their plain functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moekit.argtypes import nonneg_int, positive_int
from moekit.quant.cli import add_load_args, quant_config


def _cache_sizes(text: str):
    from moekit.offload.plan_report import parse_cache_sizes

    try:
        return parse_cache_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _policies(text: str) -> list[str]:
    from moekit.offload.planner import POLICIES

    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(POLICIES)}; got {text!r}")
    return list(dict.fromkeys(names))


def _bandwidth(text: str) -> float | None:
    """A number of GB/s, or "measured" (None)."""
    if text == "measured":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 'measured' or a number of GB/s > 0, got {text!r}")
    return value


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rtraced {done:,}/{total:,} tokens", end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or done % max(1, total // 10) < max(1, total // 10 // 2 + 1):
        print(f"traced {done:,}/{total:,} tokens", file=sys.stderr, flush=True)


def _replay_progress(done: int, total: int, label: str) -> None:
    print(f"replayed {done}/{total}: {label}", file=sys.stderr, flush=True)


def cmd_trace(args) -> int:
    import torch

    from moekit.data.sources import resolve_sources
    from moekit.inference.loading import load_for_inference
    from moekit.offload.trace import record_trace

    resolve_sources(args.data)  # a missing --data path fails before minutes of loading
    qcfg = quant_config(args)
    if qcfg is not None:
        qcfg.check_supported()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tok, _ = load_for_inference(args.model, dtype=args.dtype, device=args.device, check_memory=not args.force,
                                       quantize=qcfg, reference=args.reference)
    trace = record_trace(model, tok, args.data, args.model, args.max_tokens, args.window, args.decode_tokens,
                         progress=_progress)
    trace.save(args.out)
    h = trace.header
    speed = f"; in-memory decode {h.decode_tokens_per_s:.1f} tokens/s" if h.decode_tokens_per_s else ""
    print(f"wrote {args.out}: {trace.num_tokens:,} tokens x {trace.num_layers} MoE layers x top-{h.top_k} "
          f"of {h.num_experts} experts{speed}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from moekit.offload.diskspeed import measure_read_bandwidth
    from moekit.offload.plan_report import plan_rows, plot, print_table, summary
    from moekit.offload.trace import check_trace_matches, load_trace, model_config_of

    trace = load_trace(args.trace)
    if args.model is not None:
        check_trace_matches(trace.header, model_config_of(args.model), args.model, f"trace {args.trace}")
    if args.bandwidth is None:
        bandwidth, source = measure_read_bandwidth(Path(args.trace).resolve().parent), "measured here, cold read"
    else:
        bandwidth, source = args.bandwidth, "given"
    long = trace.experts.size > 2_000_000  # about a second per replay and more: say where it is
    rows = plan_rows(trace, args.cache_sizes, args.policies, args.prefetch, bandwidth,
                     progress=_replay_progress if long else None)
    info = summary(trace, bandwidth, source)
    if args.json:
        print(json.dumps({**info, "rows": rows}, indent=2))
    else:
        print_table(info, rows)
    if args.plot:
        plot(rows, info, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("trace", help="record which experts every token uses in every MoE layer (for plan-offload)")
    s.add_argument("model", metavar="MODEL", help="a moekit run folder or a Hugging Face (or quantized) model folder")
    s.add_argument("--data", nargs="+", action="extend", required=True, metavar="PATH",
                   help="text to run: files or folders (.txt, .py, .jsonl, ... as training reads them)")
    s.add_argument("--out", required=True, metavar="TRACE", help="trace file to write (safetensors)")
    s.add_argument("--max-tokens", type=positive_int, default=4096, help="tokens to trace at most (default: 4096)")
    s.add_argument("--window", type=positive_int, default=None,
                   help="tokens per forward window (default and maximum: the model's context)")
    s.add_argument("--decode-tokens", type=nonneg_int, default=16,
                   help="tokens of in-memory greedy decode to time, the compute the planner adds transfers to "
                        "(default: 16; 0 = skip)")
    add_load_args(s)  # --quantize: the trace's expert bytes are then the quantized ones
    s.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the checkpoint's)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    s.add_argument("--threads", type=positive_int, default=None, metavar="N", help="CPU threads for torch (default: torch's)")
    s.add_argument("--force", action="store_true", help="skip the check that the model fits in the memory available")
    s.set_defaults(func=cmd_trace)

    s = sub.add_parser("plan-offload", help="replay a routing trace through expert caches: hit rate, bytes and "
                                            "tokens/s per cache size and policy")
    s.add_argument("trace", metavar="TRACE_FILE", help="a trace file written by moekit trace")
    s.add_argument("--cache-sizes", type=_cache_sizes, required=True, metavar="SIZES",
                   help="comma list of cache sizes: experts per MoE layer (2,4,8) and/or expert budgets (0.5GB,512MB)")
    s.add_argument("--policies", type=_policies, default=["lru", "lfu", "belady"], metavar="NAMES",
                   help="comma list of lru, lfu, belady (the offline optimum) (default: lru,lfu,belady)")
    s.add_argument("--prefetch", action="store_true",
                   help="also replay lru/lfu with the next-layer prefetch guess recorded in the trace")
    s.add_argument("--bandwidth", type=_bandwidth, default=None, metavar="GB/S",
                   help="expert load bandwidth in GB/s, or 'measured' (default: a cold 64 MB read next to the trace)")
    s.add_argument("--model", default=None, metavar="MODEL",
                   help="check that the trace was recorded on this model (run folder, model folder, config, preset)")
    s.add_argument("--plot", default=None, metavar="PNG", help="write hit rate and tokens/s against cache size here")
    s.add_argument("--json", action="store_true", help="print the summary and one record per row as JSON")
    s.set_defaults(func=cmd_plan)


__all__ = ["add_parser", "cmd_trace", "cmd_plan"]
