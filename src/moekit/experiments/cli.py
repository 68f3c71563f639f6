"""``moekit experiment NAME``: the parser and its plain function."""

from __future__ import annotations

import shlex
import sys

from moekit.argtypes import nonneg_int, positive_float, positive_int
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
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    command = _command(args)
    result = run_experiment(args.name, args.out or f"runs/experiments/{args.name}", cfg, steps=args.steps,
                            minutes=args.minutes, scale=args.scale, seeds=args.seeds, overwrite=args.overwrite,
                            command=command,
                            log=lambda s: print(s, file=sys.stderr))
    for r in result["rows"]:
        sd = (r["spread"].get("final_val_loss") or {}).get("sd") if args.seeds > 1 else None
        loss = "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}" + (f" ± {sd:.4f}" if sd else "")
        print(f"{r['variant']:<20} final val loss {loss}  tokens {r['tokens']:,}  train {r['train_seconds'] or 0:.0f}s")
    return 0


def _command(args) -> str:
    """The command line that reproduces this run, for the results page."""
    parts = ["moekit", "experiment", args.name]
    for dest in ("minutes", "steps", "scale", "seeds", "out", "threads", *_TRAIN_FLAGS):
        value = getattr(args, dest)
        if value is None or (dest == "minutes" and args.steps is not None) or (dest in ("scale", "seeds") and value == 1):
            continue
        flag = "--" + dest.replace("_", "-")
        parts += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    for assignment in args.set or []:
        parts += ["--set", assignment]
    return " ".join(shlex.quote(p) for p in parts)


def add_parser(sub) -> None:
    s = sub.add_parser("experiment", help="train an experiment's variants on equal tokens; results table and plots")
    s.add_argument("name", choices=list(EXPERIMENTS), help="which experiment: " + ", ".join(EXPERIMENTS))
    s.add_argument("--minutes", type=positive_float, default=10.0,
                   help="time for the whole experiment, turned into equal steps per variant by timing a few "
                        "steps first (default: 10); ignored with --steps")
    s.add_argument("--steps", type=positive_int, help="optimizer steps per variant (exact and reproducible)")
    s.add_argument("--scale", type=positive_float, default=1.0, help="multiply the steps (tokens) per variant (default: 1)")
    s.add_argument("--seeds", type=positive_int, default=1,
                   help="repeat every variant with seeds --seed, --seed+1, ... (init and batch order; default 1); "
                        "the table shows mean ± standard deviation")
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
