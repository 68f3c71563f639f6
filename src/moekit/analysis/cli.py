"""``moekit analyze RUN_DIR``: the parser and its plain function."""

from __future__ import annotations

import sys

from moekit.argtypes import positive_float, positive_int


def cmd_analyze(args) -> int:
    from moekit.analysis.report import AnalyzeOptions, analyze
    from moekit.training.loop import resolve_device

    sigmas = tuple(args.sigma) if args.sigma else AnalyzeOptions.sigmas
    report = analyze(args.run_dir, args.out, args.data or None, args.categories, args.checkpoint,
                     str(resolve_device(args.device)), AnalyzeOptions(max_tokens=args.max_tokens, sigmas=sigmas),
                     log=lambda s: print(s, file=sys.stderr))
    for L in report["layers"]:
        print(f"layer {L['layer']}: max_violation {L['max_violation']:.3f}  cv {L['cv']:.3f}  "
              f"entropy {L['router_entropy']:.3f}  dead {L['dead_experts']}  dropped {L['dropped_fraction']:.4f}  "
              f"I(expert; category) {L['specialization']['mutual_information_bits']:.3f} bits")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("analyze", help="routing report of a trained run: balance, categories, stability, co-activation")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by moekit train")
    s.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                   help="analyze on this text (default: the run's held-out documents)")
    s.add_argument("--out", help="report folder (default: RUN_DIR/analysis)")
    s.add_argument("--categories", metavar="FILE",
                   help="your own token categories: lines of name<TAB>regex or name=regex (first match wins)")
    s.add_argument("--checkpoint", default="last", help="last (default), best, or a step number")
    s.add_argument("--max-tokens", type=positive_int, default=32768, help="evaluation tokens (default: 32768)")
    s.add_argument("--sigma", type=positive_float, nargs="+", metavar="S",
                   help="input noise levels for the stability test, relative to token RMS (default: 0.01 0.05 0.2)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.set_defaults(func=cmd_analyze)


__all__ = ["add_parser", "cmd_analyze"]
