"""Multi-stage variants: a variant that starts from an earlier variant's final model.

    Variant("upcycled-copy", ..., start=Start("dense", upcycled(num_experts=8, top_k=2), continues=True))
    Variant("distilled", ..., start=Start("teacher", switch_student), distill=Distill("teacher"))

The runner trains an experiment's variants in list order, one seed at a time, so a start or a
teacher names an earlier variant of the same seed. ``transform`` turns the start model into
this variant's first model (an upcycle, a distillation student; None keeps it as it is).
``continues`` says the run goes on from where the start ended: its training batches are the
ones after the start's (together the same token stream as one run of the total length) and
its curve is drawn after the start's, in tokens, FLOPs and seconds. A fine-tune on another
corpus does not continue: its curve starts at 0 tokens of the new data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from moekit.model import MoETransformer

Transform = Callable[["MoETransformer", int, "list[torch.Tensor]"], "MoETransformer"]
"""(start model, seed, a few training batches [B, S+1]) -> the variant's first model. The seed
is the run's: a transform's own randomness (a new router) is part of the initialization."""


@dataclass(frozen=True)
class Start:
    variant: str  # an earlier variant of the experiment
    transform: Transform | None = None  # None: train the start model as it is
    continues: bool = False  # go on with the start's token stream (else a fresh one, from batch 0)


@dataclass(frozen=True)
class Distill:
    """Train against an earlier variant's final model as teacher, Switch's loss (adapt/distill.py)."""

    teacher: str
    alpha: float = 0.25  # weight of the soft cross-entropy; Switch's best mix
    temperature: float = 1.0


def upcycled(**up) -> Transform:
    """A transform: sparse upcycling with these ``UpcycleConfig`` fields (router seeded by the run)."""

    def transform(model, seed, batches):
        from moekit.adapt.upcycle import UpcycleConfig, upcycle

        return upcycle(model, UpcycleConfig(seed=seed, **up))

    return transform


def switch_student(teacher, seed, batches):
    """A transform: the dense student of Switch's recipe, non-expert weights copied from the
    teacher and each FFN the routing-frequency-weighted average of its layer's experts."""
    import torch

    from moekit.adapt.distill import (
        dense_student_config,
        expert_frequencies,
        init_student,
    )
    from moekit.model import MoETransformer

    torch.manual_seed(seed)
    student = MoETransformer(dense_student_config(teacher.cfg))
    init_student(student, teacher, expert_frequencies(teacher, batches))
    return student


def start_model(start: Start, start_dir, seed: int, batches):
    """The variant's first model and the tokenizer it goes with (the start run's)."""
    from moekit.adapt.source import load_source

    src = load_source(start_dir)
    model = src.model.train()
    if start.transform is not None:
        model = start.transform(model, seed, batches)
    return model, src.tokenizer


def distill_loss(distill: Distill, teacher_dir, device):
    """The ``loss_fn`` for ``train``: Switch's mix against the teacher run's final model."""
    from moekit.adapt.distill import DistillLoss
    from moekit.adapt.source import load_source

    teacher = load_source(teacher_dir).model.to(device)
    return DistillLoss(teacher, alpha=distill.alpha, temperature=distill.temperature)


__all__ = ["Start", "Distill", "Transform", "upcycled", "switch_student", "start_model", "distill_loss"]
