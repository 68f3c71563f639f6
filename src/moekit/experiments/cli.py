"""``moekit experiment NAME``: the parser and its plain function."""

from __future__ import annotations

import argparse
import shlex
import sys

from moekit.argtypes import FloatArg, nonneg_int, positive_float, positive_int
from moekit.errors import UsageError
from moekit.experiments.registry import EXPERIMENTS

# flag dest -> dotted TrainConfig key
_TRAIN_FLAGS = {"data": "data.sources", "tokenizer": "data.tokenizer", "seq_len": "seq_len",
                "batch_size": "batch_size", "eval_batches": "eval_batches", "seed": "seed", "device": "device",
                "precision": "precision", "cache_dir": "cache_dir"}


def build_train_config(args):
    """TrainConfig defaults < the flags < --set (training fields only: the variants are the models)."""
    from moekit.presets import get_preset
    from moekit.training.config import TrainConfig, apply_override

    train_d = TrainConfig().to_dict()
    for dest, key in _TRAIN_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            d = train_d
            *parents, last = key.split(".")
            for p in parents:
                d = d[p]
            d[last] = value
    model_d = get_preset("tiny-moe").to_dict()  # a target for model keys, only to refuse them
    before = repr(model_d)
    for assignment in args.set or []:
        apply_override(train_d, model_d, assignment)
        if repr(model_d) != before:
            raise UsageError(f"--set {assignment}: --set changes training fields only; the experiment defines the models")
    return TrainConfig.from_dict(train_d)


def cmd_experiment(args) -> int:
    from moekit.experiments.runner import run_experiment

    cfg = build_train_config(args)
    exp = EXPERIMENTS[args.name]
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    variants = _variants(args, exp, log)
    budgets = exp.budgets if args.budgets is None else args.budgets
    sweep = _sweep_config(args, exp)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    command, out = _command(args), args.out or f"runs/experiments/{args.name}"
    if budgets:
        return _run_budgets(args, cfg, list(budgets), sweep, variants, command, out, log)
    if args.report_only:
        raise UsageError("--report-only needs budgets (--budgets, or an experiment with its own: scaling)")
    result = run_experiment(args.name, out, cfg, steps=args.steps, minutes=args.minutes, scale=args.scale,
                            seeds=args.seeds, overwrite=args.overwrite, variants=variants, sweep=sweep,
                            command=command, log=log)
    for r in result["rows"]:
        sd = (r["spread"].get("final_val_loss") or {}).get("sd") if args.seeds > 1 else None
        loss = "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}" + (f" ± {sd:.4f}" if sd else "")
        print(f"{r['variant']:<20} final val loss {loss}  tokens {r['tokens']:,}  train {r['train_seconds'] or 0:.0f}s")
    return 0


def _variants(args, exp, log):
    """--variants -> the chosen variants (with what they build on), None for all of them."""
    from moekit.experiments.registry import select_variants

    if args.variants is None:
        return None
    chosen, added = select_variants(exp.variants(), args.variants)
    if added:
        log(f"--variants: also {', '.join(added)}, which the chosen ones start from or learn from")
    return chosen


def _sweep_config(args, exp):
    """--lr-sweep (or the experiment's own sweep) -> a SweepConfig, None for no sweep."""
    from moekit.experiments.sweep import SweepConfig

    lrs = exp.lr_sweep if args.lr_sweep is None else args.lr_sweep
    if not lrs:
        return None
    if any(a.split("=", 1)[0].strip() in ("lr", "train.lr") for a in args.set or []):
        raise UsageError("--set lr=... and a learning-rate sweep exclude each other: pass --lr-sweep none to "
                         "train at one learning rate")
    return SweepConfig(tuple(lrs), args.sweep_fraction)


def _run_budgets(args, cfg, budgets, sweep, variants, command: str, out: str, log) -> int:
    """One experiment per token budget and the report across them (experiments/scaling.py)."""
    from moekit.experiments.scaling import run_scaling, tokens_label

    if args.steps is not None:
        raise UsageError("--steps does not apply with token budgets: pass --budgets 0.5M,2M (and --scale)")
    report = run_scaling(args.name, out, cfg, budgets, scale=args.scale, seeds=args.seeds, sweep=sweep,
                         variants=variants, overwrite=args.overwrite, report_only=args.report_only, command=command,
                         log=log)
    for t in report["tables"]:
        for r in t["rows"]:
            final = r["final"]
            loss = "-" if not final else f"{final['mean']:.4f}" + (f" ± {final['sd']:.4f}" if final["n"] > 1 else "")
            print(f"{tokens_label(t['tokens']):>6} {r['variant']:<20} final val loss {loss}  seeds done "
                  f"{len(r['seeds'])}")
    print(report["sanity"]["text"])
    return 0


def _command(args) -> str:
    """The command line that reproduces this run, for the results page."""
    parts = ["moekit", "experiment", args.name]
    budgets = args.budgets is not None or bool(EXPERIMENTS[args.name].budgets)
    for dest in ("variants", "minutes", "steps", "scale", "seeds", "budgets", "lr_sweep", "sweep_fraction", "out",
                 "threads",
                 *_TRAIN_FLAGS):
        value = getattr(args, dest)
        if value is None or (dest == "minutes" and (args.steps is not None or budgets)) or \
                (dest in ("scale", "seeds") and value == 1) or (dest == "sweep_fraction" and value == 0.25):
            continue
        flag = "--" + dest.replace("_", "-")
        if dest == "variants":
            parts += [flag, ",".join(value)]
        elif dest in ("budgets", "lr_sweep"):
            parts += [flag, _list_text(dest, value)]
        else:
            parts += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    for assignment in args.set or []:
        parts += ["--set", assignment]
    return " ".join(shlex.quote(p) for p in parts)


def _list_text(dest: str, values: list) -> str:
    from moekit.experiments.scaling import tokens_label
    from moekit.experiments.sweep import format_lr

    if not values:
        return "none"
    return ",".join(tokens_label(v) if dest == "budgets" else format_lr(v) for v in values)


def _token_list(text: str) -> list[int]:
    from moekit.experiments.scaling import parse_tokens

    try:
        return [parse_tokens(t) for t in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"an empty variant name in {text!r}")
    return names


def _lr_list(text: str) -> list[float]:
    if text.strip().lower() == "none":
        return []
    lr = FloatArg(0.0, strict=True)
    values = [lr(t) for t in text.split(",")]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a learning rate appears twice in {text!r}")
    return values


def add_parser(sub) -> None:
    s = sub.add_parser("experiment", help="train an experiment's variants on equal tokens; results table and plots")
    s.add_argument("name", choices=list(EXPERIMENTS), help="which experiment: " + ", ".join(EXPERIMENTS))
    s.add_argument("--variants", type=_name_list, metavar="NAME,...",
                   help="train only these of the experiment's variants (and the stages they start from), in "
                        "the experiment's order, whose first is the baseline; the results page shows only "
                        "these: --variants tiny-moe,output-x2 (default: all)")
    s.add_argument("--minutes", type=positive_float, default=10.0,
                   help="time for the whole experiment, turned into equal steps per variant by timing a few "
                        "steps first (default: 10); ignored with --steps")
    s.add_argument("--steps", type=positive_int, help="optimizer steps per variant (exact and reproducible)")
    s.add_argument("--scale", type=positive_float, default=1.0, help="multiply the steps (tokens) per variant (default: 1)")
    s.add_argument("--seeds", type=positive_int, default=1,
                   help="repeat every variant with seeds --seed, --seed+1, ... (init and batch order; default 1); "
                        "the table shows mean ± standard deviation")
    s.add_argument("--budgets", type=_token_list, metavar="TOKENS,...",
                   help="train the whole experiment once per token budget per variant, smallest first, into "
                        "OUT/budget-LABEL, and write a report across them (OUT/scaling.md): 0.5M,2M,8M "
                        "(default: the experiment's own; scaling has 0.5M,2M,8M); --scale multiplies them")
    s.add_argument("--lr-sweep", type=_lr_list, metavar="LR,...",
                   help="per variant (and budget), train short runs at these peak learning rates on the first "
                        "seed and use the one with the lowest final validation loss for the full runs: "
                        "3e-4,1e-3,3e-3 (default: the experiment's own, scaling has that one; none = no sweep)")
    s.add_argument("--sweep-fraction", type=FloatArg(0.0, strict=True, maximum=1.0), default=0.25,
                   help="each sweep run's share of the full budget's steps (default: 0.25)")
    s.add_argument("--report-only", action="store_true",
                   help="with budgets: write the report from the runs that have finished in --out, train nothing")
    s.add_argument("--out", help="results folder (default: runs/experiments/NAME)")
    s.add_argument("--overwrite", action="store_true", help="retrain variants whose run folders already exist")
    s.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                   help="training text (default: Python's stdlib source)")
    s.add_argument("--tokenizer", help="bpe (default), bytes, or a tokenizer.json")
    s.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: 128)")
    s.add_argument("--batch-size", type=positive_int, help="sequences per step (default: 8)")
    s.add_argument("--eval-batches", type=positive_int, help="validation batches per evaluation (default: 8)")
    s.add_argument("--seed", type=nonneg_int, help="seed of initialization and batches, the same for all variants "
                   "(the first of --seeds)")
    s.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    s.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 = autocast (for GPUs)")
    s.add_argument("--cache-dir", help="tokenized data cache (default: $MOEKIT_CACHE or ~/.cache/moekit)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training field: lr=1e-3 (repeatable)")
    s.add_argument("--threads", type=positive_int,
                   help="CPU threads for torch (default: torch's); 1 is far faster on a busy shared machine")
    s.set_defaults(func=cmd_experiment)


__all__ = ["add_parser", "cmd_experiment", "build_train_config"]
