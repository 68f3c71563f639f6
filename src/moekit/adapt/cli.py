"""``moekit upcycle``: the parser and its plain function."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

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


def add_parser(sub) -> None:
    s = sub.add_parser("upcycle", help="turn a dense model into an MoE model whose step-0 output is the dense one")
    s.add_argument("dense", metavar="DENSE", help="a moekit dense run folder or a Hugging Face Llama/Mistral/Qwen2 folder")
    s.add_argument("--experts", type=int, required=True, help="routed experts per layer")
    s.add_argument("--top-k", type=int, required=True, help="experts per token (a multiple of --granularity)")
    s.add_argument("--granularity", type=int, default=1,
                   help="split the FFN into G shards along its width, experts of width d_ff/G (virtual groups; "
                        "default 1: whole copies)")
    s.add_argument("--shared", type=int, default=0, help="always-on shared experts, each a copy of the FFN (default 0)")
    s.add_argument("--strategy", choices=("copy", "drop"), default="copy",
                   help="copy: every expert a copy (default); drop: Drop-Upcycling, re-initialize part of each expert")
    s.add_argument("--drop-ratio", type=float, default=0.5,
                   help="with --strategy drop: share of each expert's hidden units re-initialized (default 0.5)")
    s.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to the expert weights (default 0)")
    s.add_argument("--seed", type=int, default=0, help="seed of the router init, drop choices and noise (default 0)")
    s.add_argument("--out", required=True, help="the new model folder (must not exist or be empty)")
    from moekit.training.cli import add_resource_args

    add_resource_args(s)
    s.set_defaults(func=cmd_upcycle)


__all__ = ["add_parser", "cmd_upcycle"]
