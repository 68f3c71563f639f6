"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule.

The schedule is a pure function of the step and the training time spent, so it has no state
of its own to checkpoint: restoring (step, elapsed) restores it exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.training.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, router_lr_mult: float = 1.0) -> list[dict]:
    """Matrices (linear and expert weights, embeddings) decay; vectors do not.

    Norm gains and biases are 1-D: decaying them pulls them towards 0, which is not a prior
    anyone wants (GPT-2/nanoGPT convention). The routers' balancing bias is a buffer, not a
    parameter, so the optimizer never sees it: only ``update_expert_bias`` moves it.

    With ``router_lr_mult`` != 1 the routers' parameters get groups of their own whose
    learning rate is the schedule's times that factor (``set_lr``). Otherwise there are just
    the two groups, so checkpoints of runs without it keep their optimizer layout.
    """
    from moekit.layers.routers import Router

    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()} \
        if router_lr_mult != 1.0 else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            groups.setdefault((id(p) in routers, p.dim() >= 2), []).append(p)
    out = [{"params": groups.get((False, True), []), "weight_decay": weight_decay, "decays": True},
           {"params": groups.get((False, False), []), "weight_decay": 0.0, "decays": False}]
    for decays in (True, False):
        if (True, decays) in groups:
            out.append({"params": groups[(True, decays)], "weight_decay": weight_decay if decays else 0.0,
                        "decays": decays, "lr_mult": router_lr_mult})
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # fused: one kernel over every tensor instead of a dozen elementwise passes. On tiny-moe's
    # 17.6M parameters (2-core CPU) a step takes 17 ms instead of 111 ms, ~15 % of a training
    # step; an MoE has more parameters per FLOP than a dense model, so this matters more here.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.router_lr_mult), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
        fused=fused,
    )


def schedule_progress(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """How far through the decay phase, in [0, 1]: steps after warm-up over the steps planned,
    or the share of the time budget spent, whichever is further along. With a budget, the
    learning rate thus reaches its floor when the time runs out rather than never."""
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / decay_steps
    if cfg.time_budget is not None:
        progress = max(progress, elapsed_s / (cfg.time_budget * 60))
    return min(max(progress, 0.0), 1.0)


def lr_at(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``
    (Loshchilov & Hutter 2017, as in GPT-3 and LLaMA). ``step`` counts from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = schedule_progress(step, elapsed_s, cfg)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Put ``cfg``'s betas and weight decay into an optimizer restored from a checkpoint
    (``load_state_dict`` brings back the saved ones). The groups that decay are marked
    (``param_groups``; in checkpoints from before the mark, group 0); the learning rate is
    set every step from the schedule."""
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = (cfg.beta1, cfg.beta2)
        if group.get("decays", i == 0):
            group["weight_decay"] = cfg.weight_decay


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's learning rate, times a group's ``lr_mult`` (the routers' own factor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


__all__ = ["param_groups", "build_optimizer", "apply_hyperparameters", "lr_at", "schedule_progress", "set_lr"]
