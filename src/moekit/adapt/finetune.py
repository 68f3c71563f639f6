"""Fine-tuning: ``train`` on an existing model (``moekit train --init MODEL``) with a freeze
policy and routing health logged at every evaluation. A caller of the trainer, not a fork."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.console import Console

from moekit.adapt.health import RouterDrift
from moekit.adapt.source import load_source
from moekit.training.config import TrainConfig
from moekit.training.loop import TrainResult, train


def finetune(init: str | Path, cfg: TrainConfig, run_dir: str | Path, *, console: Console | None = None,
             checkpoint: str | int = "last", check_memory: bool = True, parallel=None) -> TrainResult:
    """Train the model of ``init`` (a run folder, an upcycled folder or a Hugging Face folder) on
    ``cfg.data`` into the new run ``run_dir``, with its own tokenizer; ``cfg.trainable`` and
    ``cfg.freeze`` choose what trains. The run resumes like any other (``moekit train --resume``),
    freezing the same parameters."""
    src = load_source(init, checkpoint, check_memory=check_memory)
    cfg = replace(cfg, init=str(init))
    drift = RouterDrift(src.model) if src.model.moe_layers() else None
    return train(cfg, src.model, run_dir, console=console, tokenizer=src.tokenizer, check_memory=check_memory,
                 parallel=parallel, on_eval=drift)


__all__ = ["finetune"]
