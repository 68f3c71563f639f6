"""``moekit upcycle`` and ``moekit distill``: the parsers and their plain functions."""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

from moekit.argtypes import FloatArg, nonneg_float, nonneg_int, positive_float, positive_int
from moekit.errors import UsageError

# Files of a Hugging Face folder that travel with its tokenizer.json (special tokens, chat template).
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
UPCYCLE_RECORD = "upcycle.json"


def cmd_upcycle(args) -> int:
    import torch

    from moekit.adapt.source import load_source
    from moekit.adapt.upcycle import UpcycleConfig, check_upcyclable, step0_logit_difference, upcycle
    from moekit.training.cli import apply_threads
    from moekit.training.run import check_new_run_dir

    apply_threads(args.threads)
    up = UpcycleConfig(num_experts=args.experts, top_k=args.top_k, granularity=args.granularity, shared=args.shared,
                       strategy=args.strategy, drop_ratio=args.drop_ratio, noise=args.noise, seed=args.seed)
    if args.drop_ratio != 0.5 and args.strategy != "drop":
        raise UsageError("--drop-ratio needs --strategy drop")
    out = Path(args.out)
    check_new_run_dir(out)  # refused before the dense model is read
    src = load_source(args.dense, check_memory=not args.force)
    check_upcyclable(src.model.cfg, up)
    moe = upcycle(src.model, up)
    S = min(64, moe.cfg.max_seq_len)
    tokens = torch.randint(0, moe.cfg.vocab_size, (2, S), generator=torch.Generator().manual_seed(args.seed))
    diff = step0_logit_difference(src.model, moe, tokens)
    _write_upcycled(out, src, moe, up, diff)
    pc_dense, pc_moe = src.model.num_params(), moe.num_params()
    print(f"upcycled {args.dense} ({pc_dense / 1e6:.2f}M dense parameters) -> {out} ({pc_moe / 1e6:.2f}M, "
          f"{up.num_experts} experts of width {moe.cfg.moe.d_expert}, top-{up.top_k}, strategy {up.strategy}, "
          f"granularity {up.granularity}, shared {up.shared})")
    print(f"step-0 max |logit difference| to the dense model: {diff:.3g} (fp32, {tokens.numel()} random tokens)")
    print(f"next: moekit train --init {out} --data ... --out RUN")
    return 0


def _write_upcycled(out: Path, src, moe, up, diff: float) -> None:
    """A run folder (configs, tokenizer, a step-0 checkpoint) plus ``upcycle.json``, the record of
    where it came from: ``eval``, ``sample``, ``generate`` and ``train --init`` take it like any run."""
    from moekit.fileio import atomic_write_json
    from moekit.training.checkpoint import save_checkpoint
    from moekit.training.config import TrainConfig
    from moekit.training.run import write_run_files

    train_cfg = src.train_cfg or TrainConfig(seq_len=min(128, moe.cfg.max_seq_len))
    write_run_files(out, train_cfg, moe.cfg, src.tokenizer)
    if src.kind == "hf":
        for name in ("tokenizer.json", *TOKENIZER_EXTRAS):  # byte for byte, as published
            if (src.path / name).is_file():
                shutil.copyfile(src.path / name, out / name)
    save_checkpoint(out, moe, {"step": 0})
    atomic_write_json(out / UPCYCLE_RECORD, dict(source=str(src.path), source_kind=src.kind, config=asdict(up),
                                                 step0_max_logit_diff=diff))


def cmd_distill(args) -> int:
    import torch

    from moekit.adapt.distill import DistillLoss, dense_student_config, expert_frequencies, gain_kept, init_student
    from moekit.adapt.source import load_source
    from moekit.resolve import resolve_config
    from moekit.data.dataset import prepare_data, train_batch
    from moekit.model import MoETransformer
    from moekit.training.cli import _init_train_config, _new_out, apply_threads
    from moekit.training.loop import evaluate, train
    from moekit.training.run import check_new_run_dir, is_run_dir, load_run

    apply_threads(args.threads)
    loss_fn_args = dict(alpha=args.alpha, temperature=args.temperature)
    cfg = replace(_init_train_config(args), init=str(args.teacher), loss="distill")
    out = _new_out(args, f"distill-{Path(args.teacher).name}")
    check_new_run_dir(out)
    if args.baseline and not is_run_dir(args.baseline):
        raise UsageError(f"--baseline {args.baseline} is not a moekit run folder (no train_config.json)")
    src = load_source(args.teacher, check_memory=not args.force)
    teacher = src.model
    if args.student == "dense":
        student_cfg = dense_student_config(teacher.cfg)
    else:
        student_cfg = replace(resolve_config(args.student)[1], vocab_size=teacher.cfg.vocab_size)
    data = prepare_data(cfg.data, cfg.cache_dir, tokenizer=src.tokenizer, log=print)
    batches = [train_batch(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, i) for i in range(4)]
    torch.manual_seed(cfg.seed)
    student = MoETransformer(student_cfg)
    done = init_student(student, teacher, expert_frequencies(teacher, batches) if teacher.moe_layers() else [])
    averaged = sum(name.endswith(".ffn") for name in done)
    print(f"student {student.num_params() / 1e6:.2f}M parameters: {len(done) - averaged} tensors copied from the "
          f"teacher, {averaged} dense FFNs from the routing-weighted average of the experts")
    result = train(cfg, student, out, tokenizer=src.tokenizer, loss_fn=DistillLoss(teacher, **loss_fn_args),
                   check_memory=not args.force)
    val = load_run(out).validation_batches(log=lambda s: None)
    teacher_loss = evaluate(teacher, val).loss
    line = f"validation loss: student {result.final_val_loss:.4f}, teacher {teacher_loss:.4f}"
    if args.baseline:
        base_loss = evaluate(load_run(args.baseline).model, val).loss
        line += f", baseline {base_loss:.4f}"
        try:
            line += f"; the student keeps {100 * gain_kept(base_loss, result.final_val_loss, teacher_loss):.1f}% of " \
                    "the teacher's gain over the baseline"
        except ValueError as e:
            line += f"; no gain to share ({e})"
    else:
        line += " (pass --baseline RUN, the same student trained without the teacher, for the share of the gain kept)"
    print(line)
    return 130 if result.status == "interrupted" else 0


def add_parser(sub) -> None:
    s = sub.add_parser("upcycle", help="turn a dense model into an MoE model whose step-0 output is the dense one")
    s.add_argument("dense", metavar="DENSE", help="a moekit dense run folder or a Hugging Face Llama/Mistral/Qwen2 folder")
    s.add_argument("--experts", type=positive_int, required=True, help="routed experts per layer")
    s.add_argument("--top-k", type=positive_int, required=True, help="experts per token (a multiple of --granularity)")
    s.add_argument("--granularity", type=positive_int, default=1,
                   help="split the FFN into G shards along its width, experts of width d_ff/G (virtual groups; "
                        "default 1: whole copies)")
    s.add_argument("--shared", type=nonneg_int, default=0, help="always-on shared experts, each a copy of the FFN (default 0)")
    s.add_argument("--strategy", choices=("copy", "drop"), default="copy",
                   help="copy: every expert a copy (default); drop: Drop-Upcycling, re-initialize part of each expert")
    s.add_argument("--drop-ratio", type=FloatArg(0.0, maximum=1.0), default=0.5,
                   help="with --strategy drop: share of each expert's hidden units re-initialized (default 0.5)")
    s.add_argument("--noise", type=nonneg_float, default=0.0, help="std of Gaussian noise added to the expert weights (default 0)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="seed of the router init, drop choices and noise (default 0)")
    s.add_argument("--out", required=True, help="the new model folder (must not exist or be empty)")
    from moekit.training.cli import add_resource_args

    add_resource_args(s)
    s.set_defaults(func=cmd_upcycle)
    _add_distill(sub)


def _add_distill(sub) -> None:
    from moekit.training.cli import TRAIN_FLAGS, add_resource_args

    s = sub.add_parser("distill", help="distill an MoE teacher into a dense (or any) student, Switch's recipe")
    s.set_defaults(**{dest: None for dest in TRAIN_FLAGS}, preset=None, config=None, overwrite=False)
    s.add_argument("teacher", metavar="TEACHER", help="the teacher: a run folder, upcycled folder or HF folder")
    s.add_argument("--student", default="dense",
                   help="dense (default: the teacher with dense FFNs of the expert width), a preset name or a "
                        "model config JSON; its vocabulary is the teacher's")
    s.add_argument("--data", nargs="+", action="extend", metavar="PATH", help="training text (default: the stdlib)")
    s.add_argument("--alpha", type=FloatArg(0.0, maximum=1.0), default=0.25,
                   help="weight of the soft cross-entropy to the teacher; 1 - alpha on the labels (default 0.25, Switch)")
    s.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature of both distributions (default 1)")
    s.add_argument("--baseline", metavar="RUN",
                   help="the same student trained without the teacher: report the share of the teacher's gain kept")
    s.add_argument("--out", help="the student's run folder (default: runs/distill-TEACHER-TIMESTAMP)")
    for flag, kind, text in (("--max-steps", positive_int, "optimizer steps (default 1000)"),
                             ("--batch-size", positive_int, "sequences per micro-batch (default 8)"),
                             ("--seq-len", positive_int, "tokens per sequence (default 128)"),
                             ("--lr", positive_float, "peak learning rate (default 2e-3)"),
                             ("--warmup-steps", nonneg_int, "linear warm-up steps (default 20)"),
                             ("--eval-every", positive_int, "validation every N steps (default 50)"),
                             ("--eval-batches", positive_int, "validation batches per evaluation (default 8)"),
                             ("--ckpt-every", positive_int, "checkpoint every N steps (default 100)"),
                             ("--seed", nonneg_int, "seed of the student init and batches (default 0)")):
        s.add_argument(flag, type=kind, help=text)
    s.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 = autocast for the student")
    s.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    s.add_argument("--cache-dir", help="tokenized data cache (default: $MOEKIT_CACHE or ~/.cache/moekit)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any training field, e.g. lr=1e-3 (repeatable)")
    add_resource_args(s)
    s.set_defaults(func=cmd_distill)


__all__ = ["add_parser", "cmd_upcycle", "cmd_distill"]
