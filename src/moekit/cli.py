"""The ``moekit`` command line: each subcommand is a plain function of its parsed arguments.

Bad input gives one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time

from moekit.argtypes import nonneg_int, positive_int
from moekit.config import ModelConfig
from moekit.errors import UsageError
from moekit.resolve import resolve_config
from moekit.training.cli import add_resource_args, apply_threads

# Bad input under torchrun: ranks other than 0 wait this long before exiting, since torchrun's
# agent stops all ranks at the first exit and rank 0 (which fails alike) is the one that says why.
# (CI once lost rank 0's line when rank 1 reached the check first.)
RANK_ERROR_GRACE_S = 3.0

# Packages whose cli module registers more subcommands: add_parser(sub) adds each one with its
# plain function. Imported when the parser is built; they import torch only inside commands,
# so `moekit --help` and `moekit presets` start without it.
COMMAND_MODULES = (
    "moekit.training.cli",  # train, eval, sample
    "moekit.inference.cli",  # generate, chat
    "moekit.bench.cli",  # bench layer, bench generate
    "moekit.analysis.cli",  # analyze
    "moekit.experiments.cli",  # experiment
    "moekit.serve.cli",  # serve
    "moekit.adapt.cli",  # upcycle, distill
    "moekit.adapt.lora_cli",  # lora merge
    "moekit.quant.cli",  # quantize
    "moekit.offload.trace_cli",  # trace, plan-offload
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        # A refused value (moekit.argtypes) names the flag and the rule: "--steps must be >= 1, got 0".
        refused = re.match(r"argument ([^:]+): (must .*)", message)
        line = f"{refused[1]} {refused[2]}" if refused else f"{message} (see --help)"
        self.exit(2, f"{self.prog}: error: {line}\n")



def cmd_inspect(args) -> int:
    from moekit.accounting import format_report, summary

    if args.audit:
        from moekit.audit import audit_table

        print(audit_table())
        return 0
    if args.target is None:
        raise UsageError("inspect needs a target (a preset, a paper model or a config) or --audit")
    if _inspect_paper_model(args):
        return 0
    label, cfg = resolve_config(args.target)
    split = _parallel_split(cfg, args)
    if args.json:
        extra = {"parallel": split} if split else {}
        print(json.dumps({"name": label, "config": cfg.to_dict(), **summary(cfg, args.seq_len), **extra}, indent=2))
    else:
        print(format_report(cfg, label, args.seq_len))
        if split:
            from moekit.distributed.arithmetic import format_parallel

            print(format_parallel(split))
    return 0


def _inspect_paper_model(args) -> bool:
    """Switch, GShard, Grok-1, GPT-4 (rumoured): counted from their published shapes (audit.py)."""
    from moekit.audit import PAPER_MODELS, format_paper_report, paper_summary

    if args.target not in PAPER_MODELS:
        return False
    if args.ep is not None or args.gpus is not None or args.seq_len is not None:
        raise UsageError(f"{args.target} is counted from its paper's shape; --seq-len/--ep/--gpus apply to presets "
                         "and configs only")
    print(json.dumps(paper_summary(args.target), indent=2) if args.json else format_paper_report(args.target))
    return True


def _parallel_split(cfg: ModelConfig, args) -> dict | None:
    """``inspect --ep/--gpus``: all-to-all volume and memory per GPU (distributed/arithmetic.py)."""
    if args.ep is None and args.gpus is None:
        if args.batch_size is not None:
            raise UsageError("--batch-size needs --ep or --gpus (it sizes the all-to-all traffic per step)")
        return None
    from moekit.distributed.arithmetic import parallel_summary

    ep = args.ep or 1
    seq_len = args.seq_len or min(cfg.max_seq_len, 4096)
    return parallel_summary(cfg, ep, args.gpus or ep, seq_len, args.batch_size)


def cmd_presets(args) -> int:
    from moekit.accounting import count_params, human
    from moekit.presets import PRESETS

    for name, (desc, make) in PRESETS.items():
        pc = count_params(make())
        print(f"{name:<20} {human(pc.total):>8} total {human(pc.active):>8} active  {desc}")
    return 0


def cmd_demo(args) -> int:
    """Inspect a preset, then run a few forward/backward/AdamW steps on random tokens."""
    import torch

    from moekit.accounting import format_report
    from moekit.memory import check_fits, is_out_of_memory
    from moekit.model import MoETransformer

    label, cfg = resolve_config(args.preset)
    print(format_report(cfg, label, args.seq_len))
    threads = apply_threads(args.threads)
    check_fits(cfg, "cpu", training=True, force=args.force, what=label)
    torch.manual_seed(args.seed)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seq = min(args.seq_len or 128, cfg.max_seq_len)
    print(f"\n{args.steps} forward/backward steps, batch {args.batch_size} x {seq} random tokens, "
          f"{threads} CPU thread(s):")
    try:
        _demo_steps(model, opt, torch.randint(0, cfg.vocab_size, (args.batch_size, seq + 1)), args.steps)
    except RuntimeError as e:  # the weights fit (checked above); a batch's activations may not
        if not is_out_of_memory(e):
            raise
        raise UsageError(f"out of memory with a batch of {args.batch_size} x {seq} tokens: lower --batch-size "
                         "or --seq-len") from None
    for i, s in enumerate(model.routing_stats()):
        print(f"  MoE layer {i}: tokens/expert {s.tokens_per_expert.tolist()}  max_violation {s.max_violation:.2f}  "
              f"entropy {s.router_entropy:.3f}  dead {s.dead_experts}  dropped {s.dropped_fraction:.3f}")
    return 0


def _demo_steps(model, opt, tokens, steps: int) -> None:
    from moekit.model import lm_loss

    batch, seq = tokens.shape[0], tokens.shape[1] - 1
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        out = model(tokens[:, :-1])
        loss = lm_loss(out, tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        opt.step()
        model.update_expert_bias()
        dt = time.perf_counter() - t0
        print(f"  step {step}: lm loss {loss.lm.item():.4f}  aux {loss.aux.item():.5f}  "
              f"{batch * seq / dt:,.0f} tokens/s")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moekit", description="Build, inspect, train and analyze Mixture-of-Experts language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("inspect", help="total vs active parameters, FLOPs per token and memory of a model")
    s.add_argument(
        "target", nargs="?",
        help="a preset name (see `moekit presets`), a paper model (switch-c-2048, gshard-600b, grok-1, "
             "gpt-4-rumoured, ...), a moekit or Hugging Face config JSON, or a folder with config.json",
    )
    s.add_argument("--audit", action="store_true",
                   help="print the table of published claims vs moekit's counts (docs/audits.md)")
    s.add_argument("--seq-len", type=positive_int, default=None, help="context length for attention FLOPs (default: max_seq_len)")
    s.add_argument("--ep", type=positive_int, default=None,
                   help="expert-parallel degree: adds all-to-all bytes and memory per GPU (default with --gpus: 1)")
    s.add_argument("--gpus", type=positive_int, default=None,
                   help="GPUs in all, a multiple of --ep: memory per GPU and GPUs needed (default: --ep)")
    s.add_argument("--batch-size", type=positive_int, default=None,
                   help="with --ep/--gpus: sequences per step over all GPUs, for traffic per step (default: 1 per GPU; "
                        "sequence length: --seq-len, else min(max_seq_len, 4096))")
    s.add_argument("--json", action="store_true", help="print the numbers as JSON")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("presets", help="list the named presets with their sizes")
    s.set_defaults(func=cmd_presets)

    s = sub.add_parser("demo", help="inspect a preset and run a short forward/backward demo")
    s.add_argument("--preset", default="tiny-moe", help="preset to build (default: tiny-moe)")
    s.add_argument("--steps", type=positive_int, default=5, help="optimizer steps (default: 5)")
    s.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default: 8)")
    s.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence (default: 128)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: 0)")
    add_resource_args(s)
    s.set_defaults(func=cmd_demo)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command line; returns the exit status (argparse's own exits included)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a flag refused while parsing (one line, status 2)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except UsageError as e:  # bad input only: anything else is a bug and keeps its traceback
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: rank 0 says it
            print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        else:  # torchrun stops every rank when the first one exits: let rank 0 get its line out first
            time.sleep(RANK_ERROR_GRACE_S)
        return 2
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `moekit eval --json | head`: the reader left. Point stdout at devnull so the
        # interpreter's final flush does not raise a second time (Python docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for SIGPIPE
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Close the torchrun process group a command joined (see ``leave_process_group``)."""
    if "moekit.distributed.mesh" in sys.modules:  # loaded only by commands that may join one
        sys.modules["moekit.distributed.mesh"].leave_process_group()
