"""``moekit lora merge`` and ``moekit lora export``: a LoRA run's adapters folded into plain
weights, or written in PEFT's layout."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from moekit.errors import UsageError

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def _load_lora_run(run_dir: str, checkpoint: str, force: bool):
    from moekit.training.run import is_run_dir, load_run, read_run_configs

    if not is_run_dir(run_dir):
        raise UsageError(f"{run_dir} is not a moekit run folder (no train_config.json)")
    train_cfg, _ = read_run_configs(run_dir)
    if train_cfg.trainable != "lora":
        raise UsageError(f"{run_dir} was not trained with --train lora (it trained {train_cfg.trainable}): "
                         "nothing to merge")
    return load_run(run_dir, checkpoint, "cpu", check_memory=not force, merge_lora=False)


def cmd_lora_merge(args) -> int:
    import torch

    from moekit.adapt.lora import merge_lora
    from moekit.fileio import atomic_write_json
    from moekit.training.checkpoint import save_checkpoint
    from moekit.training.cli import apply_threads
    from moekit.training.run import check_new_run_dir, write_run_files

    apply_threads(args.threads)
    out = Path(args.out)
    check_new_run_dir(out)
    run = _load_lora_run(args.run_dir, args.checkpoint, args.force)
    model = run.model
    S = min(32, model.cfg.max_seq_len)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(tokens).logits
        n = merge_lora(model)
        diff = float((model(tokens).logits - adapted).abs().max())
    train_cfg = replace(run.train_cfg, trainable="all", freeze=[])  # a plain model: fine-tune it like any run
    write_run_files(out, train_cfg, model.cfg, run.tokenizer)
    for name in TOKENIZER_FILES:  # a Hugging Face tokenizer's extras travel with it
        if (Path(args.run_dir) / name).is_file():
            shutil.copyfile(Path(args.run_dir) / name, out / name)
    save_checkpoint(out, model, {"step": run.step}, val_loss=run.val_loss)
    atomic_write_json(out / "lora_merge.json", dict(source=str(args.run_dir), checkpoint=str(run.checkpoint),
                                                    step=run.step, modules_merged=n, max_logit_diff=diff))
    print(f"merged {n} adapted module(s) of {run.checkpoint} into {out}; max |logit difference| to the adapted "
          f"model {diff:.3g} (fp32, {tokens.numel()} random tokens)")
    return 0


def cmd_lora_export(args) -> int:
    from moekit.adapt.lora_peft import export_peft
    from moekit.training.cli import apply_threads

    apply_threads(args.threads)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty")
    run = _load_lora_run(args.run_dir, args.checkpoint, args.force)
    export_peft(run.model, run.train_cfg.lora_config(), out, args.architecture, base_model=run.train_cfg.init)
    arch = args.architecture or run.model.cfg.hf_architecture
    print(f"wrote the adapters of {run.checkpoint} in PEFT's layout to {out} (for {arch}); load with "
          f"peft.PeftModel.from_pretrained(base, {str(out)!r}), base = the Hugging Face export of the start model")
    return 0


def add_parser(sub) -> None:
    from moekit.training.cli import add_resource_args

    lora = sub.add_parser("lora", help="LoRA adapters of a run trained with --train lora: merge them into the weights, or "
                          "export them for PEFT")
    lsub = lora.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)
    s = lsub.add_parser("merge", help="fold a LoRA run's adapters into its weights: a plain run folder")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run folder trained with moekit train --train lora")
    s.add_argument("--out", required=True, help="the merged model's run folder (must not exist or be empty)")
    s.add_argument("--checkpoint", default="last", help="last (default), best, or a step number")
    add_resource_args(s)
    s.set_defaults(func=cmd_lora_merge)
    s = lsub.add_parser("export", help="write a LoRA run's adapters in PEFT's layout (fused experts via target_parameters)")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run folder trained with moekit train --train lora")
    s.add_argument("--out", required=True, help="the PEFT adapter folder (must not exist or be empty)")
    s.add_argument("--architecture", help="the Hugging Face architecture of the base export (default: the one the "
                   "model was loaded from, e.g. Qwen3MoeForCausalLM)")
    s.add_argument("--checkpoint", default="last", help="last (default), best, or a step number")
    add_resource_args(s)
    s.set_defaults(func=cmd_lora_export)


__all__ = ["add_parser", "cmd_lora_merge", "cmd_lora_export"]
