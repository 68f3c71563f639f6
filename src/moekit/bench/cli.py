"""``moekit bench layer`` (MoELayer vs dense-active and transformers, see layer.py) and
``moekit bench generate`` (the engine vs transformers' generate, see generate.py)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
from pathlib import Path

from moekit.argtypes import IntArg, nonneg_int, positive_int
from moekit.errors import UsageError
from moekit.fileio import atomic_write_json

QUICK = dict(tokens=512, repeats=5, warmup=1, dtypes="fp32")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    bsub = p.add_subparsers(dest="bench_command", required=True, parser_class=type(p))
    s = bsub.add_parser("layer", help="time MoELayer vs a dense FFN of the active size and vs transformers' MoE block")
    s.add_argument("--shapes", default="coarse,fine,fine+shared", help="comma list of coarse, fine, fine+shared")
    s.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    s.add_argument("--modes", default="fwd+bwd,fwd,decode1,decode8", help="comma list of fwd+bwd, fwd, decode1, decode8")
    s.add_argument("--tokens", type=positive_int, default=4096, help="tokens for fwd+bwd and fwd (default: 4096)")
    s.add_argument("--repeats", type=IntArg(5), default=5, help="timed repeats per candidate, median reported (>= 5: medians of fewer mislead)")
    s.add_argument("--warmup", type=nonneg_int, default=2, help="untimed calls per candidate first (default: 2)")
    s.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 steadies timings on a busy machine")
    s.add_argument("--loop", action="store_true", help="also time moekit's reference per-expert loop")
    s.add_argument("--no-hf", action="store_true", help="skip transformers' blocks")
    s.add_argument("--json", dest="json_path", metavar="OUT", default=None,
                   help="also write the results as JSON to this file (default: no file)")
    s.add_argument("--quick", action="store_true",
                   help="a fast smoke run: 512 tokens, fp32, 5 repeats, 1 warm-up (overrides those flags)")
    s.set_defaults(func=cmd_bench_layer)

    s = bsub.add_parser("quant", help="MoE-layer decode at batch 1: fp32/bf16 vs int8/int4 experts (medians, interleaved)")
    s.add_argument("--d-model", type=positive_int, default=1024, help="model width (default: 1024)")
    s.add_argument("--d-expert", type=positive_int, default=2048, help="expert hidden width (default: 2048)")
    s.add_argument("--experts", type=positive_int, default=8, help="experts in the layer (default: 8)")
    s.add_argument("--top-k", type=positive_int, default=2, help="experts per token (default: 2)")
    s.add_argument("--formats", default="fp32,bf16,int8,int4", help="comma list of fp32, bf16, int8, int4")
    s.add_argument("--group-size", type=positive_int, choices=(32, 64, 128, 256), default=64, help="int4 group size (default: 64)")
    s.add_argument("--repeats", type=IntArg(5), default=7, help="timed repeats per format, median reported (>= 5)")
    s.add_argument("--calls", type=positive_int, default=50, help="single-token forwards per repeat (default: 50)")
    s.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    s.add_argument("--json", dest="json_path", default=None, help="also write the results to this JSON file")
    s.set_defaults(func=cmd_bench_quant)
    _add_generate_parser(bsub)
    _add_offload_parser(bsub)


def _add_generate_parser(bsub) -> None:
    from moekit.argtypes import IntArg, nonneg_int, positive_int

    s = bsub.add_parser("generate", help="prefill/decode tokens/s of the engine vs transformers' generate, "
                                         "bandwidth bound and peak memory")
    s.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (default: both)")
    s.add_argument("--batches", default="1,8", help="comma list of batch sizes (default: 1,8)")
    s.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens per sequence (default: 128)")
    s.add_argument("--new-tokens", type=IntArg(2), default=32, help="generated tokens per sequence (default: 32)")
    s.add_argument("--repeats", type=positive_int, default=3, help="interleaved timed repeats, median reported (default: 3)")
    s.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    s.add_argument("--no-hf", action="store_true", help="skip transformers (engine figures only)")
    s.add_argument("--fast-decode", action="store_true",
                   help="also time the engine with fast decode (decode steps through a kernel built by "
                        "AOTInductor; needs a C++ compiler), interleaved with the plain engine and transformers")
    s.add_argument("--memory-prefill-chunk", type=nonneg_int, default=256, metavar="N",
                   help="also measure peak memory with prompts prefilled N tokens per forward, as "
                        "`moekit generate --prefill-chunk N` does (default: 256; 0 = whole prompts only)")
    s.add_argument("--json", dest="json_path", default="bench_generate.json", help="where to write the JSON results")
    s.add_argument("--quick", action="store_true",
                   help="a fast smoke run: a ~50M model, prompts of 32, 8 new tokens, fp32, 3 repeats")
    s.set_defaults(func=_cmd_bench_generate)


def _add_offload_parser(bsub) -> None:
    from moekit.argtypes import FloatArg

    s = bsub.add_parser("offload", help="decode with experts offloaded behind a cache vs all in memory: "
                                        "tokens/s, peak RSS, hit rate (a random MoE written to a temporary folder)")
    s.add_argument("--size-gb", type=FloatArg(0.0, strict=True), default=2.0,
                   help="fp32 experts of the random MoE, GB (default: 2.0; 4 MoE layers of 1024-wide experts)")
    s.add_argument("--budget-gb", type=FloatArg(0.0, strict=True), default=0.5, help="the expert cache, GB (default: 0.5)")
    s.add_argument("--policy", choices=("lru", "lfu"), default="lru", help="eviction policy (default: lru)")
    s.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="prefetch the next layer's guessed experts (default: on)")
    s.add_argument("--prompt-len", type=positive_int, default=16, help="prompt tokens (default: 16)")
    s.add_argument("--new-tokens", type=IntArg(2), default=32, help="generated tokens per run (default: 32)")
    s.add_argument("--repeats", type=positive_int, default=3, help="interleaved runs of each mode, median reported (default: 3)")
    s.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads in the runs (default: torch's choice)")
    s.add_argument("--json", dest="json_path", metavar="OUT", default=None, help="also write the report as JSON here")
    s.add_argument("--quick", action="store_true",
                   help="a smoke run: a ~3 MB model, a 0.8 MB budget, 8 new tokens, one repeat")
    s.set_defaults(func=_cmd_bench_offload)


def _cmd_bench_offload(args) -> int:
    import tempfile

    from moekit.bench import offload as b

    if args.quick:
        args.size_gb, args.budget_gb, args.new_tokens, args.repeats, args.prompt_len = 0.003, 0.0008, 8, 1, 8
    cfg = b.bench_config(args.size_gb, args.quick)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="moekit-bench-offload-") as tmp:
        print(f"writing a random MoE ({cfg.moe.num_experts} experts x {cfg.n_layers} layers) to {tmp}", flush=True)
        sizes = b.write_random_moe(cfg, Path(tmp))
        if sizes["expert_bytes_total"] <= args.budget_gb * 1e9:
            raise UsageError(f"--budget-gb {args.budget_gb:g} holds every expert ({sizes['expert_bytes_total'] / 1e9:.3g} GB); "
                             "nothing would be offloaded")
        rep = b.run(Path(tmp), sizes, args.budget_gb, args.policy, args.prefetch, args.prompt_len, args.new_tokens,
                    args.repeats, args.threads)
    rep["meta"] = {"load_avg_start": load_start, "load_avg_end": os.getloadavg(), "cpus": os.cpu_count(),
                   "machine": _cpu_name(), "args": {k: v for k, v in vars(args).items() if k != "func"}}
    print(b.format_report(rep))
    print(f"load average {load_start[0]:.1f} at the start, {rep['meta']['load_avg_end'][0]:.1f} at the end")
    if args.json_path:
        atomic_write_json(args.json_path, rep)
        print(f"wrote {args.json_path}")
    return 0


def _cmd_bench_generate(args) -> int:
    from moekit.bench.generate import cmd_bench_generate  # imports torch: only when run

    return cmd_bench_generate(args)


def _choices(value: str, known, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in known]
    if bad or not items:
        raise UsageError(f"{flag}: unknown {bad or value!r}; choose from {', '.join(known)}")
    return items


def cmd_bench_layer(args) -> int:
    import torch

    from moekit.bench.layer import DTYPES, MODES, SHAPES

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    shapes = _choices(args.shapes, SHAPES, "--shapes")
    dtypes = _choices(args.dtypes, DTYPES, "--dtypes")
    modes = _choices(args.modes, MODES, "--modes")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _run(args, shapes, dtypes, modes)
    finally:
        torch.set_num_threads(threads)


def cmd_bench_quant(args) -> int:
    import torch

    from moekit.bench.quant import FORMATS, format_table, run

    formats = _choices(args.formats, FORMATS, "--formats")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows = run(args.d_model, args.d_expert, args.experts, args.top_k, formats, args.repeats, args.calls, args.group_size)
    print(format_table(rows))
    if args.json_path:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": _cpu_name(),
                "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
                "args": {k: v for k, v in vars(args).items() if k != "func"}}
        atomic_write_json(args.json_path, {"meta": meta, "rows": [
            {"format": r.format, "expert_bytes": r.expert_bytes, "us_per_token": r.us, "times_us": r.times_us}
            for r in rows]})
    return 0


def _run(args, shapes, dtypes, modes) -> int:
    import torch

    from moekit.bench.layer import format_table, rows_to_json, run_case
    from moekit.layers.grouped_mm import CPU_NATIVE_BF16

    load_start = os.getloadavg()
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for mode in modes:
                case = run_case(shape, dtype, mode, args.tokens, args.repeats, args.warmup, args.loop, not args.no_hf)
                print(format_table(case).split("\n", 2)[-1] if rows else format_table(case), flush=True)
                rows += case
    meta = {"torch": torch.__version__, "transformers": _version("transformers"), "threads": torch.get_num_threads(),
            "machine": _cpu_name(), "cpu_native_bf16": CPU_NATIVE_BF16, "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(), "cpus": os.cpu_count(),
            "args": {k: v for k, v in vars(args).items() if k != "func"}}
    if args.json_path:  # only when asked: a benchmark writes nothing into the current folder unasked
        atomic_write_json(args.json_path, rows_to_json(rows, meta))
        print(f"\nwrote {args.json_path}")
    return 0


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None

