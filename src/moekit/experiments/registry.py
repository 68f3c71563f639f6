"""The experiments: named lists of model variants trained on the same data and token budget.

Each checks one of the claims people choose MoEs for. The first variant of each list (or of the
subset ``--variants`` chooses) that is not a stage is the baseline that "tokens to reach the
baseline's final loss" refers to.
Everything is built from the tiny presets (4 layers, d_model 256), whose FFNs spend 1024
hidden units per token. Multi-stage variants (upcycle, finetune, distill) start from an
earlier variant's final model (experiments/stages.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from moekit.config import ModelConfig
from moekit.experiments.stages import Distill, Start, switch_student, upcycled
from moekit.presets import get_preset


@dataclass(frozen=True)
class Variant:
    name: str  # a folder name: letters, digits, dashes
    description: str
    model: ModelConfig  # what it trains; with a start, the architecture the start gives it
    start: Start | None = None  # begin from an earlier variant's final model, not a fresh one
    steps: float = 1.0  # its share of the experiment's --steps
    train: dict = field(default_factory=dict)  # TrainConfig changes (trainable, freeze, lr, ...)
    corpus: str | None = None  # train on a built-in corpus (experiments/corpora.py), not --data
    distill: Distill | None = None  # learn from an earlier variant's model too (Switch's loss)
    stage: bool = False  # a step towards the others (a pre-training, a teacher): plotted, not the baseline


@dataclass(frozen=True)
class Experiment:
    name: str
    question: str  # the claim it checks, for the results page
    variants: Callable[[], list[Variant]]
    # Training tokens per variant at which to run it, one full experiment each (experiments/
    # scaling.py); empty: one budget, from --steps or --minutes. --budgets overrides.
    budgets: tuple[int, ...] = ()
    # Learning rates to sweep per variant (experiments/sweep.py); empty: --set lr or the
    # TrainConfig default for all. --lr-sweep overrides.
    lr_sweep: tuple[float, ...] = ()
    # (larger model, smaller model): the larger must reach the lower loss at the largest budget,
    # else the setup, not the architecture, limits the comparison (the report says so).
    check: tuple[str, str] | None = None


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


def scaling() -> list[Variant]:
    # dense-vs-moe plus top-k's fine-grained MoE: every MoE spends tiny-dense's 1024 FFN units per token.
    fine = next(v for v in top_k() if v.name == "top8-of-64-shared")
    dense, moe, total = dense_vs_moe()
    return [dense, moe, dataclasses.replace(fine, name="fine-grained"), total]


def init_scale() -> list[Variant]:
    # With every matrix drawn at std 0.02 (GPT-2), an FFN's output grows with sqrt(hidden width):
    # one 512-wide expert gives 1/sqrt(2) of the 1024-wide FFN's, and two of them averaged with
    # renormalized weights 1/2 another 1/sqrt(2). benchmarks/scaling_init.py measures 0.50x.
    # DeepSeek-V3's routed_scaling_factor (2.5 there) is the knob that undoes it; same weights,
    # same batches per seed: the pair differs in that factor alone.
    moe = get_preset("tiny-moe")
    return [Variant("tiny-moe", "8 experts of 512, top-2: output 0.5x tiny-dense's FFN at init", moe),
            Variant("tiny-moe-x2", "the same, routed output x2 (routed_scaling_factor): tiny-dense's scale at init",
                    _moe(moe, routed_scaling_factor=2.0))]


def moe_knobs() -> list[Variant]:
    # Issue 20's "causes inside moekit": tiny-moe trails tiny-dense by 0.03 nats at 0.5M tokens
    # (3 seeds, lr 1e-3). Each variant changes one of its defaults and nothing else, so within a
    # seed (same init draws, same batches) the difference to tiny-moe is that knob's effect.
    moe = get_preset("tiny-moe")
    return [
        Variant("tiny-moe", "the preset: Switch balance 0.01, z-loss 1e-3, router at the model's lr", moe),
        Variant("output-x2", "routed output x2 (routed_scaling_factor): tiny-dense's FFN scale at init",
                _moe(moe, routed_scaling_factor=2.0)),
        Variant("balance-1e-3", "Switch balancing coefficient 0.001 (a tenth)", _moe(moe, load_balance_coef=0.001)),
        Variant("no-z-loss", "no router z-loss", _moe(moe, z_loss_coef=0.0)),
        Variant("router-lr-0.3x", "the routers' learning rate x0.3", moe, train=dict(router_lr_mult=0.3)),
        Variant("router-lr-3x", "the routers' learning rate x3", moe, train=dict(router_lr_mult=3.0)),
        # Added after the first seed: the two changes that helped without costing balance, together.
        Variant("x2-router-0.3x", "output x2 and the routers' learning rate x0.3",
                _moe(moe, routed_scaling_factor=2.0), train=dict(router_lr_mult=0.3)),
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


def upcycle() -> list[Variant]:
    from moekit.adapt.upcycle import UpcycleConfig, upcycled_config

    dense, moe = get_preset("tiny-dense"), get_preset("tiny-moe")
    copy, granular = dict(num_experts=8, top_k=2), dict(num_experts=8, top_k=2, granularity=2)

    def up(kw: dict) -> ModelConfig:
        return upcycled_config(dense, UpcycleConfig(**kw))

    return [  # the dense stage takes a third of the tokens; the rest continue it to the same total
        Variant("dense", "tiny-dense (FFN 1024) trained for the first third of the tokens", dense, steps=1 / 3,
                stage=True),
        Variant("continued-dense", "the dense model trained on", dense, start=Start("dense", continues=True),
                steps=2 / 3),
        # Komatsuzaki et al. 2023: every expert a copy of the FFN; top-2 of whole copies doubles
        # the active FFN compute, which the FLOPs axis shows.
        Variant("upcycled-copy", "upcycled: 8 copies of the FFN (1024 wide), top-2", up(copy),
                start=Start("dense", upcycled(**copy), continues=True), steps=2 / 3),
        # Virtual groups: 8 experts of 512 = 4 copies of 2 half-FFN shards, top-2: tiny-moe's shape
        # and the dense model's active compute.
        Variant("upcycled-granular", "upcycled: FFN split in 2 shards x 4 copies (8 of 512), top-2", up(granular),
                start=Start("dense", upcycled(**granular), continues=True), steps=2 / 3),
        Variant("moe-scratch", "tiny-moe (8 of 512, top-2) from scratch, all the tokens", moe),
    ]


def finetune() -> list[Variant]:
    # tiny-moe plus an always-on shared expert (Qwen-MoE / DeepSeekMoE style), so that the
    # fine-tunes can target shared and routed experts apart.
    moe = _moe(get_preset("tiny-moe"), num_shared_experts=1, d_shared=512)

    def tune(name: str, description: str, **train) -> Variant:  # from the pre-trained model, on prose
        return Variant(name, description, moe, start=Start("pretrain"), corpus="python-reference", train=train)

    return [
        Variant("pretrain", "tiny-moe + a shared expert of 512, pre-trained on the default corpus (stdlib code)",
                moe, steps=1.5, stage=True),
        tune("all", "fine-tune every parameter"),
        tune("non-moe", "freeze routers and experts (ST-MoE)", trainable="non-moe"),
        tune("experts-only", "train only the routed experts", trainable="experts"),
        tune("router-frozen", "every parameter but the routers", freeze=["*.ffn.router.*"]),
        # LoRA (adapt/lora.py), rank 8, alpha 16, everything else frozen: "LoRA on shared
        # experts is the safest path" against per-expert pairs on the routed experts.
        tune("lora-shared", "LoRA rank 8 on the shared expert only", trainable="lora", lora_targets=["shared"]),
        tune("lora-experts", "LoRA rank 8 on every routed expert (a pair per expert)", trainable="lora",
             lora_targets=["experts"]),
    ]


def distill() -> list[Variant]:
    from moekit.adapt.distill import dense_student_config

    teacher = get_preset("tiny-moe")
    student = dense_student_config(teacher)  # what `moekit distill --student dense` builds
    init = Start("teacher", switch_student)
    return [  # Switch Transformer's Table 7, row by row
        Variant("teacher", "tiny-moe teacher, trained on twice the students' tokens", teacher, steps=2.0,
                stage=True),
        Variant("baseline", "dense student (FFN 512) trained alone", student),
        Variant("distilled", "fresh student, 0.25 soft + 0.75 hard loss", student, distill=Distill("teacher")),
        Variant("teacher-init", "student initialized from the teacher, hard labels only", student, start=init),
        Variant("init-distilled", "teacher init + 0.25 soft loss (Switch's recipe)", student, start=init,
                distill=Distill("teacher")),
    ]


EXPERIMENTS: dict[str, Experiment] = {
    "dense-vs-moe": Experiment(
        "dense-vs-moe", "At equal active compute, does an MoE learn faster than a dense model?", dense_vs_moe),
    "scaling": Experiment(
        "scaling", "As the token budget grows, with the learning rate tuned per variant and budget and several "
        "seeds, where (if anywhere) does an MoE reach a lower loss than the dense model of equal active compute?",
        scaling,
        # Issue 20's CPU budgets; --scale multiplies them on a GPU.
        budgets=(500_000, 2_000_000, 8_000_000), lr_sweep=(3e-4, 1e-3, 3e-3), check=("dense-total", "tiny-dense")),
    "init-scale": Experiment(
        "init-scale", "Does the MoE's smaller output at initialization (half the dense FFN's) slow its training?",
        init_scale),
    "moe-knobs": Experiment(
        "moe-knobs", "Which of the MoE's defaults cost it loss: output scale at init, balancing coefficient, "
        "z-loss, router learning rate?", moe_knobs),
    "balancing": Experiment(
        "balancing", "Without balancing, does routing collapse; does aux-loss-free balancing keep balance "
        "without hurting loss?", balancing),
    "top-k": Experiment(
        "top-k", "At equal active parameters: top-1 vs top-2 of 8 vs fine-grained top-8 of 64 with a shared "
        "expert", top_k),
    "capacity": Experiment(
        "capacity", "How much do capacity limits drop, and what does it cost in loss?", capacity),
    "upcycle": Experiment(
        "upcycle", "Does a dense model upcycled into an MoE beat training the dense model on, or an MoE from "
        "scratch, at the same total tokens; and per training FLOP?", upcycle),
    "finetune": Experiment(
        "finetune", "Fine-tuning an MoE on a different corpus (prose): which parameters need to train, and does "
        "routing stay healthy?", finetune),
    "distill": Experiment(
        "distill", "How much of an MoE teacher's gain does a dense student keep (Switch Transformer, Table 7)?",
        distill),
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def select_variants(variants: list[Variant], names: list[str]) -> tuple[list[Variant], list[str]]:
    """The named variants, in the experiment's order, plus the earlier variants they start from
    or learn from (a stage is trained, or reused, before what builds on it) -> (the selection,
    the names added for that). Unknown or repeated names are a UsageError."""
    from moekit.errors import UsageError

    by_name = {v.name: v for v in variants}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"--variants: no variant {unknown[0]!r} in this experiment; its variants: "
                         f"{', '.join(by_name)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--variants names a variant twice: {','.join(names)}")
    wanted, todo = set(names), list(names)
    while todo:  # the variants a chosen one needs, and the ones those need
        v = by_name[todo.pop()]
        for ref in (v.start.variant if v.start else None, v.distill.teacher if v.distill else None):
            if ref is not None and ref not in wanted:
                wanted.add(ref)
                todo.append(ref)
    chosen = [v for v in variants if v.name in wanted]
    if all(v.stage for v in chosen):
        raise UsageError(f"--variants {','.join(names)}: only stages (steps towards the others) were chosen, "
                         "nothing to compare: add a variant that builds on them")
    return chosen, [v.name for v in chosen if v.name not in names]


__all__ = ["Variant", "Experiment", "EXPERIMENTS", "get_experiment", "select_variants", "dense_vs_moe", "scaling",
           "init_scale", "moe_knobs", "balancing", "top_k",
           "capacity", "upcycle", "finetune", "distill"]
