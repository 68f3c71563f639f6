"""A starting model for upcycling, fine-tuning or distillation: a moekit run folder (an upcycled
folder is one) or a Hugging Face model folder, with its tokenizer and training config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.data.tokenizer import TextTokenizer, load_tokenizer
from moekit.errors import UsageError
from moekit.model import MoETransformer
from moekit.training.config import TrainConfig


@dataclass
class SourceModel:
    model: MoETransformer  # eval mode, on the CPU
    tokenizer: TextTokenizer
    train_cfg: TrainConfig | None  # the run's own; None for a Hugging Face folder
    kind: str  # "run" | "hf"
    path: Path


def load_source(path: str | Path, checkpoint: str | int = "last", *, check_memory: bool = True) -> SourceModel:
    """The model (fp32 for a run, the checkpoint's dtype for HF), its tokenizer and config.
    The tokenizer is read first: a folder without one fails before any weight is read."""
    from moekit.inference.loading import folder_kind

    folder = Path(path)
    kind = folder_kind(folder)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    if kind == "run":
        from moekit.training.run import load_run

        run = load_run(folder, checkpoint, "cpu", check_memory=check_memory)
        return SourceModel(run.model, tokenizer, run.train_cfg, kind, folder)
    from moekit.interop import from_pretrained

    try:
        model = from_pretrained(folder, dtype=torch.float32, check_memory=check_memory)
    except ValueError as e:  # interop names unsupported configs and bad files as ValueError
        raise UsageError(" ".join(str(e).split())) from None
    return SourceModel(model, tokenizer, None, kind, folder)


__all__ = ["SourceModel", "load_source"]
