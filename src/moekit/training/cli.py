"""``moekit train``, ``moekit eval`` and ``moekit sample``: parsers and their plain functions.

Config precedence for ``train``: the preset (or model config JSON), then ``--config FILE``,
then the flags, then ``--set KEY=VALUE`` (last wins).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from moekit.argtypes import FloatArg, IntArg, nonneg_float, nonneg_int, positive_float, positive_int
from moekit.errors import UsageError
from moekit.quant.cli import add_load_args, quant_config

# flag dest -> dotted TrainConfig key
TRAIN_FLAGS = {
    "data": "data.sources", "text_field": "data.text_field", "tokenizer": "data.tokenizer",
    "vocab_size": "data.vocab_size", "val_fraction": "data.val_fraction",
    "max_steps": "max_steps", "time_budget": "time_budget", "batch_size": "batch_size", "seq_len": "seq_len",
    "grad_accum": "grad_accum", "lr": "lr", "warmup_steps": "warmup_steps", "seed": "seed",
    "precision": "precision", "device": "device", "eval_every": "eval_every", "eval_batches": "eval_batches",
    "ckpt_every": "ckpt_every", "keep_last": "keep_last", "cache_dir": "cache_dir",
    "train_preset": "trainable", "freeze": "freeze",
    "lora_rank": "lora_rank", "lora_alpha": "lora_alpha", "lora_targets": "lora_targets",
    "lora_dropout": "lora_dropout", "expert_dropout": "expert_dropout",
}


def comma_list(text: str) -> list[str]:
    """'attention, experts' -> ['attention', 'experts']; an empty list is refused."""
    import argparse

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"must name at least one target, got {text!r}")
    return items


def _stderr_log(text: str) -> None:
    print(text, file=sys.stderr)


def apply_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads)`` when given -> the intra-op thread count in use."""
    import torch

    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def add_resource_args(s) -> None:
    """--threads and --force: the flags of every command that builds a model."""
    s.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for torch (default: torch's, one per core); on a busy or shared machine "
                        "use fewer than the idle cores, often 1")
    s.add_argument("--force", action="store_true",
                   help="skip the check that the model fits in the memory available")


def _given_train_values(args) -> dict[str, object]:
    return {key: getattr(args, dest) for dest, key in TRAIN_FLAGS.items() if getattr(args, dest) is not None}


def _set_dotted(d: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def build_configs(args):
    """Preset/model file < --config < flags < --set -> (label, TrainConfig, ModelConfig)."""
    from moekit.config import ModelConfig
    from moekit.resolve import resolve_config
    from moekit.training.config import TrainConfig, apply_override, load_config_file, merge

    file = load_config_file(args.config) if args.config else {}
    label, base = resolve_config(args.preset or file.pop("preset", None) or "tiny-moe")
    model_over = file.pop("model", None) or {}
    if not isinstance(model_over, dict):
        raise UsageError(f"{args.config}: 'model' must be a mapping of model config fields")
    train_d = merge(TrainConfig().to_dict(), file)
    for key, value in _given_train_values(args).items():
        _set_dotted(train_d, key, value)
    model_d = merge(base.to_dict(), model_over)
    for assignment in args.set or []:
        apply_override(train_d, model_d, assignment)
    if model_d["vocab_size"] != base.vocab_size:
        raise UsageError("the model's vocab_size follows the tokenizer: set --vocab-size (data.vocab_size) instead")
    return label, TrainConfig.from_dict(train_d), ModelConfig.from_dict(model_d)


def _resume_overrides(args) -> dict:
    from moekit.training.config import apply_override
    from moekit.training.run import read_run_configs

    for flag in ("preset", "config"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} cannot be combined with --resume: the run's own config is used")
    given = _given_train_values(args)
    train_d: dict = {}
    for key, value in given.items():
        _set_dotted(train_d, key, value)
    _, model_cfg = read_run_configs(args.resume)
    model_d = model_cfg.to_dict()
    for assignment in args.set or []:
        apply_override(train_d, model_d, assignment)
        if model_d != model_cfg.to_dict():
            raise UsageError(f"cannot change the model when resuming (--set {assignment})")
    return train_d


def _init_train_config(args):
    """--init: TrainConfig defaults < --config (training fields only) < flags < --set; the model
    is the one in the --init folder, unchanged."""
    from moekit.training.config import TrainConfig, apply_override, load_config_file, merge

    if args.preset is not None:
        raise UsageError("--preset cannot be combined with --init: the model is the one in the --init folder")
    file = load_config_file(args.config) if args.config else {}
    if "preset" in file or "model" in file:
        raise UsageError(f"{args.config}: 'preset' and 'model' do not apply with --init (its model is used as is)")
    train_d = merge(TrainConfig().to_dict(), file)
    for key, value in _given_train_values(args).items():
        _set_dotted(train_d, key, value)
    model_d: dict = {}
    for assignment in args.set or []:
        apply_override(train_d, model_d, assignment)
        if model_d:
            raise UsageError(f"--set {assignment}: the model of --init cannot change when fine-tuning")
    return TrainConfig.from_dict(train_d)


def _new_out(args, label: str) -> Path:
    from moekit.training.run import is_run_dir

    out = Path(args.out or f"runs/{Path(label).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.overwrite and out.exists():
        if not is_run_dir(out):
            raise UsageError(f"--overwrite refuses to delete {out}: it is not a moekit run folder")
        shutil.rmtree(out)
    return out


def cmd_train(args) -> int:
    from moekit.training.loop import NonFiniteLossError, OutOfMemoryStop, resume_run, train

    if args.init and args.resume:
        raise UsageError("--init starts a new run from a model; --resume continues a run: give one of them")
    if not args.resume:
        for flag in ("checkpoint", "change_optimizer"):
            if getattr(args, flag) not in (None, False):
                raise UsageError(f"--{flag.replace('_', '-')} needs --resume RUN_DIR")
    apply_threads(args.threads)
    parallel = _parallel_config(args)
    try:
        if args.resume:
            result = resume_run(args.resume, _resume_overrides(args), checkpoint=args.checkpoint or "last",
                                change_optimizer=args.change_optimizer, check_memory=not args.force,
                                check_finite=not args.no_check_finite, parallel=parallel)
        elif args.init:
            from moekit.adapt.finetune import finetune

            cfg = _check_lora_flags(args, _init_train_config(args))
            result = finetune(args.init, cfg, _new_out(args, f"finetune-{Path(args.init).name}"),
                              check_memory=not args.force, parallel=parallel)
        else:
            label, cfg, model_cfg = build_configs(args)
            _check_lora_flags(args, cfg)
            result = train(cfg, model_cfg, _new_out(args, label), check_memory=not args.force, parallel=parallel)
    except (NonFiniteLossError, OutOfMemoryStop) as e:
        print(f"moekit train: error: {e}", file=sys.stderr)
        return 1
    if result.final_val_loss is not None and _is_rank_0():
        start = f" (from {result.initial_val_loss:.3f} at step 0)" if result.initial_val_loss is not None else ""
        print(f"final validation loss {result.final_val_loss:.4f}{start}, perplexity "
              f"{math.exp(min(result.final_val_loss, 50)):.1f}, after {result.step} steps; run folder {result.run_dir}")
    return 130 if result.status == "interrupted" else 0


def _check_lora_flags(args, cfg):
    """--lora-* flags shape adapters that exist only with --train lora: never ignore them."""
    given = [f"--{d.replace('_', '-')}" for d in ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout")
             if getattr(args, d, None) is not None]
    if given and cfg.trainable != "lora":
        raise UsageError(f"{', '.join(given)} need --train lora (this run trains {cfg.trainable})")
    return cfg


def _parallel_config(args):
    """--ep/--dp/--fsdp/--balance-stats -> ParallelConfig, or None (one process, or plain data
    parallelism under torchrun)."""
    if args.ep is None and args.dp is None and not args.fsdp and args.balance_stats is None and args.ckpt_format is None:
        return None
    from moekit.distributed.mesh import ParallelConfig

    return ParallelConfig(ep=args.ep or 1, dp=args.dp, fsdp=args.fsdp, balance_stats=args.balance_stats or "local",
                          ckpt_format=args.ckpt_format or "sharded")


def _is_rank_0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cmd_eval(args) -> int:
    from moekit.training.loop import evaluate, resolve_device
    from moekit.training.report import routing_table
    from moekit.training.run import load_run

    qcfg = quant_config(args)  # its flag errors before the run is loaded
    threads = apply_threads(args.threads)
    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device), check_memory=not args.force,
                   check_finite=not args.no_check_finite)
    _stderr_log(f"evaluating {run.checkpoint} on {run.model.embed.weight.device} ({threads} CPU thread(s))")
    if qcfg:  # quantize at load: the perplexity cost of int8/int4 (docs/results.md)
        from moekit.quant import quantize_model

        _stderr_log(quantize_model(run.model, qcfg).format())
    batches = run.validation_batches(batch_size=args.batch_size, max_batches=args.batches,
                                     sources=args.data or None, log=_stderr_log)
    ev = evaluate(run.model, batches, run.train_cfg.precision)
    tokens = sum(b[:, 1:].numel() for b in batches)
    if args.json:
        print(json.dumps(dict(checkpoint=str(run.checkpoint), step=run.step, val_loss=ev.loss, val_ppl=ev.ppl,
                              tokens=tokens, routing=[r.to_dict() for r in ev.routing]), indent=2))
        return 0
    print(f"{run.checkpoint} (step {run.step}): validation loss {ev.loss:.4f}, perplexity {ev.ppl:.2f} "
          f"over {tokens:,} tokens")
    if ev.routing:
        from rich.console import Console

        Console().print(routing_table(ev.routing))
    return 0


def cmd_sample(args) -> int:
    from moekit.inference.engine import Engine
    from moekit.inference.sampling import SamplingParams
    from moekit.inference.tokenization import load_tokenizer
    from moekit.training.loop import resolve_device
    from moekit.training.run import load_run

    apply_threads(args.threads)
    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device), check_memory=not args.force,
                   check_finite=not args.no_check_finite)
    tokenizer = load_tokenizer(args.run_dir)  # the run's own, with the streaming detokenizer
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            seed=args.seed, stop_token_ids=tuple(tokenizer.eos_ids))
    ids = tokenizer.encode(args.prompt) or tokenizer.eos_ids  # empty prompt: a document start
    ids = ids[-run.model_cfg.max_seq_len:]  # the most recent tokens that fit the context
    print(args.prompt, end="", flush=True)
    for piece in Engine(run.model, tokenizer, max_batch=1).stream(ids, params):
        print(piece, end="", flush=True)
    print()
    return 0


def add_parser(sub) -> None:
    """Register train, eval and sample on the ``moekit`` subparsers."""
    s = sub.add_parser("train", help="train a model on text (default: tiny-moe on Python's stdlib source)")
    s.add_argument("--preset", help="preset name or model config JSON (default: tiny-moe)")
    s.add_argument("--config", metavar="FILE", help="YAML or JSON file of training fields, plus 'preset' and 'model' overrides")
    s.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                   help="files, folders or globs of .txt/.md/.py/.rst/.jsonl/.parquet (default: Python's stdlib source)")
    s.add_argument("--text-field", help="text field of .jsonl lines / column of .parquet files (default: text)")
    s.add_argument("--tokenizer", help="bpe (default, trained on the training split), bytes, or a tokenizer.json")
    s.add_argument("--vocab-size", type=IntArg(258), help="BPE vocabulary size (default: 8192)")
    s.add_argument("--val-fraction", type=FloatArg(0.0, strict=True, maximum=1.0), help="share of documents held out for validation (default: 0.05)")
    s.add_argument("--out", help="run folder (default: runs/PRESET-TIMESTAMP)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing run folder at --out")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint, exactly")
    s.add_argument("--init", metavar="MODEL",
                   help="fine-tune: start a new run from this model (a run folder, an upcycled folder or a Hugging "
                        "Face folder) and its tokenizer, on --data")
    s.add_argument("--train", dest="train_preset",
                   choices=("all", "non-moe", "attention", "experts", "router", "shared", "lora"),
                   help="which module kinds train (default all; non-moe = ST-MoE's frozen MoE parameters; lora = "
                        "low-rank adapters only, see --lora-*); prints a coverage line")
    s.add_argument("--lora-rank", type=positive_int, help="with --train lora: adapter rank r (default 8)")
    s.add_argument("--lora-alpha", type=positive_float, help="with --train lora: scale alpha / r (default 16)")
    s.add_argument("--lora-targets", type=comma_list, metavar="LIST",
                   help="with --train lora: comma list of attention, dense, shared, experts (routed, a pair per "
                        "expert), all (default), or name patterns (blocks.1.*); one matching nothing is an error")
    s.add_argument("--lora-dropout", type=FloatArg(0.0, maximum=1.0),
                   help="with --train lora: dropout on the adapters' input in training (default 0)")
    s.add_argument("--expert-dropout", type=FloatArg(0.0, maximum=1.0),
                   help="dropout on the routed experts' hidden activations, training only (Switch: 0.4 when "
                        "fine-tuning; default 0)")
    s.add_argument("--freeze", action="append", metavar="PATTERN",
                   help="also freeze parameters whose name matches this glob (blocks.0.*) or regex (repeatable); "
                        "a pattern matching nothing is an error")
    s.add_argument("--checkpoint", metavar="STEP",
                   help="with --resume: continue from this step's checkpoint (e.g. when the newest is corrupt); "
                        "later ones are moved to RUN_DIR/discarded")
    s.add_argument("--change-optimizer", action="store_true",
                   help="with --resume: allow new optimizer settings (--lr, --warmup-steps, --set beta2=...), "
                        "recorded in metrics.jsonl")
    s.add_argument("--no-check-finite", action="store_true",
                   help="with --resume: skip the NaN/inf check of the checkpoint's tensors")
    s.add_argument("--max-steps", type=positive_int, help="optimizer steps, also the cosine horizon (default: 1000)")
    s.add_argument("--time-budget", type=positive_float, metavar="MINUTES", help="stop after this many minutes of training")
    s.add_argument("--batch-size", type=positive_int,
                   help="sequences per micro-batch over all ranks (global; each of W ranks takes 1/W; default: 8)")
    s.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: 128)")
    s.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step (default: 1)")
    s.add_argument("--lr", type=positive_float, help="peak learning rate (default: 2e-3)")
    s.add_argument("--warmup-steps", type=nonneg_int, help="linear warm-up steps (default: 20)")
    s.add_argument("--seed", type=nonneg_int, help="seed of initialization, batches and router noise (default: 0)")
    s.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 = autocast; the router stays fp32")
    s.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    s.add_argument("--eval-every", type=positive_int, help="validation and routing statistics every N steps (default: 50)")
    s.add_argument("--eval-batches", type=positive_int, help="validation batches per evaluation (default: 8)")
    s.add_argument("--ckpt-every", type=positive_int, help="checkpoint every N steps (default: 100)")
    s.add_argument("--keep-last", type=positive_int, help="step checkpoints kept besides the best (default: 2)")
    s.add_argument("--cache-dir", help="tokenized data cache (default: $MOEKIT_CACHE or ~/.cache/moekit)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any field: moe.top_k=1, lr=1e-3, data.val_fraction=0.1 (repeatable)")
    add_resource_args(s)
    s.add_argument("--ep", type=positive_int, help="under torchrun: split each MoE layer's experts over this many ranks "
                   "(expert parallelism; must divide the experts and the world size; default: 1)")
    s.add_argument("--dp", type=positive_int, help="under torchrun: replicas of each expert slice; must equal world size / --ep "
                   "(default: that)")
    s.add_argument("--fsdp", action="store_true", help="under torchrun: shard the weights with FSDP2 (fully_shard) "
                   "instead of replicating them (DDP)")
    s.add_argument("--balance-stats", choices=("local", "global"), help="under torchrun: Switch loss from each rank's "
                   "tokens (local, default, as Megatron-Core) or from all-reduced statistics (global = single process)")
    s.add_argument("--ckpt-format", choices=("sharded", "consolidated"), help="under torchrun: checkpoints written "
                   "by every rank with torch.distributed.checkpoint, resumable at any world size, and one consolidated "
                   "model.safetensors at the end (sharded, default); or every checkpoint gathered and written by rank 0")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="validation loss, perplexity and routing statistics of a run's checkpoint")
    _run_args(s)
    s.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                   help="evaluate on this text instead (all of it held out; default: the run's validation split)")
    s.add_argument("--batches", type=positive_int, default=None, help="batches to evaluate (default: the run's eval_batches)")
    s.add_argument("--batch-size", type=positive_int, default=None, help="sequences per batch (default: the run's)")
    s.add_argument("--json", action="store_true", help="print the numbers as JSON")
    add_load_args(s)  # --quantize, --group-size, --quantize-scope, --reference
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="continue a prompt with a trained run's model")
    _run_args(s)
    s.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    s.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to generate (default: 100)")
    s.add_argument("--temperature", type=nonneg_float, default=0.8, help="0 = greedy (default: 0.8)")
    s.add_argument("--top-k", type=positive_int, default=50, help="sample among the k most likely tokens (default: 50)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed (default: 0)")
    s.set_defaults(func=cmd_sample)


def _run_args(s) -> None:
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by moekit train")
    s.add_argument("--checkpoint", default="last", help="last (default), best, or a step number")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    s.add_argument("--no-check-finite", action="store_true",
                   help="skip the NaN/inf check of the checkpoint's tensors (faster on large models)")
    add_resource_args(s)


__all__ = ["add_parser", "build_configs", "cmd_train", "cmd_eval", "cmd_sample"]
