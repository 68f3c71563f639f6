"""The experiments: named lists of model variants trained on the same data and token budget.

Each checks one of the claims people choose MoEs for. The first variant of each list is the
baseline that "tokens to reach the baseline's final loss" refers to. Everything is built from
the tiny presets (4 layers, d_model 256), whose FFNs spend 1024 hidden units per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from moekit.config import ModelConfig
from moekit.presets import get_preset


@dataclass(frozen=True)
class Variant:
    name: str  # a folder name: letters, digits, dashes
    description: str
    model: ModelConfig


@dataclass(frozen=True)
class Experiment:
    name: str
    question: str  # the claim it checks, for the results page
    variants: Callable[[], list[Variant]]


def _moe(base: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(base, moe=dataclasses.replace(base.moe, **changes))


def dense_vs_moe() -> list[Variant]:
    dense, moe = get_preset("tiny-dense"), get_preset("tiny-moe")
    total_width = moe.moe.num_experts * moe.moe.d_expert  # same FFN parameters as all 8 experts
    return [
        Variant("tiny-dense", "dense FFN 1024: tiny-moe's active parameters", dense),
        Variant("tiny-moe", "8 experts of 512, top-2", moe),
        Variant("dense-total", f"dense FFN {total_width}: tiny-moe's total parameters",
                dataclasses.replace(dense, d_ff=total_width)),
    ]


def balancing() -> list[Variant]:
    moe = get_preset("tiny-moe")
    return [
        Variant("no-balancing", "no balancing loss, no bias", _moe(moe, load_balance_coef=0.0)),
        Variant("switch-aux", "Switch auxiliary loss, coefficient 0.01", _moe(moe, load_balance_coef=0.01)),
        # DeepSeek-V3's update rate (sec. 2.1.2), with no auxiliary loss at all.
        Variant("aux-free", "aux-loss-free bias balancing, rate 1e-3 (DeepSeek-V3)",
                _moe(moe, load_balance_coef=0.0, bias_update_rate=1e-3)),
        # DeepSeek-V3's rate was tuned for ~100k steps; a short run needs a bigger step to move
        # the bias at all (it can change by at most rate x steps).
        Variant("aux-free-1e-2", "aux-loss-free bias balancing, rate 1e-2 (for short runs)",
                _moe(moe, load_balance_coef=0.0, bias_update_rate=1e-2)),
    ]


def top_k() -> list[Variant]:
    moe = get_preset("tiny-moe")
    return [  # every variant: 1024 routed-or-shared FFN units per token, dropless
        Variant("top1-of-8", "Switch-style: 8 experts of 1024, top-1", _moe(moe, d_expert=1024, top_k=1)),
        Variant("top2-of-8", "Mixtral-style: 8 experts of 512, top-2", moe),
        Variant("top8-of-64-shared", "fine-grained: 64 experts of 112, top-8, plus a shared expert of 128",
                _moe(moe, d_expert=112, num_experts=64, top_k=8, num_shared_experts=1, d_shared=128)),
    ]


def capacity() -> list[Variant]:
    moe = get_preset("tiny-moe")
    return [Variant(f"capacity-{cf}", f"capacity factor {cf}: overflowing slots are dropped",
                    _moe(moe, capacity_factor=cf)) for cf in (1.0, 1.25, 2.0)] + [
        Variant("dropless", "no capacity limit", _moe(moe, capacity_factor=None))]


EXPERIMENTS: dict[str, Experiment] = {
    "dense-vs-moe": Experiment(
        "dense-vs-moe", "At equal active compute, does an MoE learn faster than a dense model?", dense_vs_moe),
    "balancing": Experiment(
        "balancing", "Without balancing, does routing collapse; does aux-loss-free balancing keep balance "
        "without hurting loss?", balancing),
    "top-k": Experiment(
        "top-k", "At equal active parameters: top-1 vs top-2 of 8 vs fine-grained top-8 of 64 with a shared "
        "expert", top_k),
    "capacity": Experiment(
        "capacity", "How much do capacity limits drop, and what does it cost in loss?", capacity),
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


__all__ = ["Variant", "Experiment", "EXPERIMENTS", "get_experiment", "dense_vs_moe", "balancing", "top_k",
           "capacity"]
