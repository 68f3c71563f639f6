"""A learning-rate sweep per variant: each variant trains on a short budget at every learning
rate of a list, and its full-budget runs (every seed) use the one with the lowest final
validation loss.

    moekit experiment dense-vs-moe --steps 300 --lr-sweep 3e-4,1e-3,3e-3   # sweeps at 75 steps, seed --seed

Why: one learning rate for every variant lets the setup decide a comparison of models of
different widths (issue 20: the dense model with 2.2x the parameters learned *slower* per
token than the small one at lr 2e-3). Tuning per variant and budget is what scaling studies
do (Kaplan et al. 2020, Hoffmann et al. 2022 tune the learning rate per model size).

A sweep run is a complete short run, its own warm-up and cosine decay to its shorter horizon,
on the first seed; its folder is OUT/sweep/lr-LR/runs/VARIANT, so an interrupted sweep resumes
and a finished one is reused like any variant. A learning rate that diverges (a non-finite
loss) is never chosen. When the best is the smallest or the largest of the list, the optimum
may lie outside it: the record says so (``at_edge``) and the results table marks it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from moekit.errors import UsageError
from moekit.experiments.registry import Variant


@dataclass(frozen=True)
class SweepConfig:
    lrs: tuple[float, ...]  # peak learning rates to try (a small log grid: 3e-4, 1e-3, 3e-3)
    fraction: float = 0.25  # each sweep run's share of the full budget's steps

    def __post_init__(self) -> None:
        if not self.lrs or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in self.lrs):
            raise ValueError(f"lrs must be positive finite learning rates, got {self.lrs!r}")
        if len(set(self.lrs)) != len(self.lrs):
            raise ValueError(f"lrs has a learning rate twice: {self.lrs!r}")
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        object.__setattr__(self, "lrs", tuple(sorted(float(x) for x in self.lrs)))

    def steps(self, full_steps: int) -> int:
        """Optimizer steps of each sweep run."""
        return max(1, round(full_steps * self.fraction))


def lr_folder(lr: float) -> str:
    return f"lr-{lr:g}"


def pick_lr(losses: dict[float, float | None]) -> float | None:
    """The learning rate with the lowest finite loss (the smaller one on a tie); None when none has one."""
    finite = [(loss, lr) for lr, loss in losses.items() if loss is not None and math.isfinite(loss)]
    return min(finite)[1] if finite else None


def with_lr(v: Variant, lr: float) -> Variant:
    return dataclasses.replace(v, train={**v.train, "lr": lr})


def tune(variants: list[Variant], sweep: SweepConfig,
         final_loss: Callable[[Variant, float], float | None]) -> tuple[list[Variant], dict]:
    """Every variant with its best learning rate, and the record of the sweep per variant.

    ``final_loss(variant with lr, lr)`` trains (or reuses) the short run -> its final
    validation loss. The variants are swept one after another, each over the whole list."""
    tuned, record = [], {}
    for v in variants:
        losses = {lr: final_loss(with_lr(v, lr), lr) for lr in sweep.lrs}
        best = pick_lr(losses)
        if best is None:
            raise UsageError(f"{v.name}: every learning rate of the sweep ({', '.join(map(format_lr, sweep.lrs))}) "
                             "diverged; sweep lower ones")
        record[v.name] = dict(chosen=best, losses=[losses[lr] for lr in sweep.lrs],
                              at_edge=len(sweep.lrs) > 1 and best in (sweep.lrs[0], sweep.lrs[-1]))
        tuned.append(with_lr(v, best))
    return tuned, record


def format_lr(lr: float) -> str:
    """3e-4, 1e-3, 2.5e-3: short and exact for a grid's values."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


__all__ = ["SweepConfig", "pick_lr", "tune", "with_lr", "lr_folder", "format_lr"]
