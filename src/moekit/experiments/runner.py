"""``run_experiment``: train every variant of an experiment on the same data, batches and
token budget (equal tokens, not equal time), then write the results.

    OUT/runs/VARIANT/   an ordinary run folder per variant (moekit eval/analyze work on it);
                        OUT/runs/seed-S/VARIANT/ for every seed S but 0 (``seeds``)
    OUT/corpora/NAME/   a built-in corpus a variant trains on (experiments/corpora.py)
    OUT/results.md      the results table, the command, the budget
    OUT/results.json    every number, including each variant's curve
    OUT/loss.png        validation loss vs tokens, vs training FLOPs, vs training seconds
    OUT/routing.png     max_violation, dead experts and dropped fraction over training
    OUT/sweep/lr-LR/    the short runs of a learning-rate sweep (``sweep``: experiments/sweep.py)

The budget is ``steps`` optimizer steps per variant; without it, ``minutes`` of the whole
experiment are turned into steps by timing a few steps of every variant first (so the
variants still get equal tokens). ``scale`` multiplies the steps. A variant whose run folder
already holds a finished run with the same configs is reused, so an interrupted experiment
continues where it stopped. Ctrl-C checkpoints the variant in training and stops the whole
experiment (KeyboardInterrupt; the CLI exits 130) without writing results; a variant also
checkpoints every tenth of its steps (at least 100), so a killed process resumes from there.

Variants are trained in list order, seed by seed; a multi-stage variant starts from an earlier
variant's final model of the same seed (experiments/stages.py: continued training, upcycling,
fine-tuning on another corpus, distillation). Its ``steps`` share of the budget is its own
steps, except that a continuation ends where ``start share + own share`` of the steps ends.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

from moekit.config import ModelConfig
from moekit.errors import UsageError
from moekit.experiments.registry import Variant, get_experiment
from moekit.experiments.results import (
    aggregate,
    mean_curves,
    summarize,
    variant_curve,
    write_results,
)
from moekit.experiments.sweep import SweepConfig, format_lr, lr_folder, tune
from moekit.training.config import TrainConfig

EVALS_PER_RUN = 8  # validation points per variant (plus the one at step 0)
# A long variant checkpoints about every tenth of its steps (at most one kept besides the final
# one), so a killed process (a reboot, an OOM, not just Ctrl-C) loses minutes, not the variant.
CKPTS_PER_RUN, MIN_CKPT_EVERY = 10, 100
# How a run is carried out, not what it computes: a finished run is the same run whatever these were.
OPERATIONAL_FIELDS = ("ckpt_every", "keep_last", "log_every")


def seconds_per_step(model_cfg, cfg: TrainConfig, data, device, steps: int = 2) -> float:
    """Median time of ``steps`` optimizer steps of a fresh model (after one warm-up step)."""
    import torch

    from moekit.data.dataset import train_batch
    from moekit.model import MoETransformer
    from moekit.training.loop import fit_model_config, train_step
    from moekit.training.optim import build_optimizer

    torch.manual_seed(cfg.seed)
    model = MoETransformer(fit_model_config(model_cfg, data.tokenizer, cfg.seq_len)).to(device)
    opt = build_optimizer(model, cfg)
    times = []
    for i in range(steps + 1):
        batches = [train_batch(data.train, cfg.batch_size, cfg.seq_len, cfg.seed, i * cfg.grad_accum + j)
                   for j in range(cfg.grad_accum)]
        t0 = time.perf_counter()
        train_step(model, opt, batches, cfg, cfg.lr, device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def steps_for_minutes(per_step: list[float], minutes: float, cfg: TrainConfig) -> int:
    """Steps per variant so that all variants together take about ``minutes``: each step
    costs its measured time, each evaluation batch about a third of a micro-batch step."""
    evals = (EVALS_PER_RUN + 1) * cfg.eval_batches / (3 * cfg.grad_accum)
    budget = minutes * 60 - evals * sum(per_step)
    return max(2, int(budget / sum(per_step)))


def variant_config(cfg: TrainConfig, steps: int) -> TrainConfig:
    ckpt_every = min(steps, max(MIN_CKPT_EVERY, steps // CKPTS_PER_RUN))
    return dataclasses.replace(cfg, max_steps=steps, time_budget=None, eval_every=max(1, steps // EVALS_PER_RUN),
                               ckpt_every=ckpt_every, keep_last=1)


def _same_run(run_dir: Path, cfg: TrainConfig, model_cfg) -> bool:
    """The folder holds a run of exactly these configs (the saved vocabulary follows the tokenizer)."""
    from moekit.training.run import read_run_configs

    saved_cfg, saved_model = read_run_configs(run_dir)
    same_model = dataclasses.replace(model_cfg, vocab_size=saved_model.vocab_size).to_dict() == saved_model.to_dict()
    operational = {f: getattr(cfg, f) for f in OPERATIONAL_FIELDS}
    same_train = dataclasses.replace(saved_cfg, **operational).to_dict() == cfg.to_dict()
    return same_model and same_train


def _plan(run_dir: Path, cfg: TrainConfig, model_cfg, overwrite: bool) -> str:
    """What to do with a variant's folder: "train" (it is then absent), "resume" or "reuse"."""
    from moekit.training.metrics import read_metrics
    from moekit.training.run import is_run_dir, read_run_configs

    if not run_dir.exists():
        return "train"
    if not is_run_dir(run_dir):
        raise UsageError(f"{run_dir} exists and is not a moekit run folder: choose another --out")
    if not overwrite and _same_run(run_dir, cfg, model_cfg):
        ends = read_metrics(run_dir, "end")
        if ends and ends[-1].get("status") == "done":
            return "reuse"
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*")):
            return "resume"
    elif not overwrite:
        steps = read_run_configs(run_dir)[0].max_steps  # a calibrated budget differs from call to call
        raise UsageError(f"{run_dir} holds a different run (of {steps} steps): pass --steps {steps} to continue "
                         f"with its budget, --overwrite to retrain, or another --out")
    shutil.rmtree(run_dir)
    return "train"


def machine() -> str:
    """What ran it, for the results page: CPU count and torch threads, or the GPU."""
    import os
    import platform

    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads{gpu}")


def run_experiment(name: str, out: str | Path, cfg: TrainConfig, *, steps: int | None = None,
                   minutes: float = 10.0, scale: float = 1.0, seeds: int = 1, overwrite: bool = False,
                   variants: list[Variant] | None = None, sweep: SweepConfig | None = None, command: str = "",
                   console=None, log: Callable[[str], None] = print) -> dict:
    """Train the experiment's variants into ``out`` and write its results; returns them.

    ``seeds`` > 1 repeats every variant with seeds ``cfg.seed``, ``cfg.seed + 1``, ...: a seed
    changes the initialization and the order of the batches and nothing else, and all variants
    of a seed read the same batches. Seed 0's runs are ``OUT/runs/VARIANT`` (where a default
    run puts them, so adding seeds reuses it), seed S's ``OUT/runs/seed-S/VARIANT``: a folder
    depends on its seed alone, so seeds can also be trained apart (``--seed 2``, in another
    process) and gathered by a later ``--seeds 3``.
    The table gives every loss as the mean over the seeds, with its standard deviation.
    ``sweep`` first picks each variant's learning rate on a short budget (experiments/sweep.py)."""
    from rich.console import Console

    from moekit.data.dataset import check_length, prepare_data
    from moekit.training.loop import resolve_device

    exp = get_experiment(name)
    variants = variants or exp.variants()
    check_variants(variants)
    if sweep is not None and any(v.start or v.distill for v in variants):
        raise UsageError("--lr-sweep needs an experiment of fresh variants (no stages, starts or teachers)")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if not (minutes > 0 and scale > 0):
        raise UsageError(f"--minutes and --scale must be > 0, got {minutes} and {scale}")
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    out, t_start = Path(out), time.perf_counter()
    console = console or Console(stderr=True)
    device = resolve_device(cfg.device)
    data = prepare_data(cfg.data, cfg.cache_dir, log=log)
    check_length(data, cfg.seq_len)
    if steps is None:
        runs = seeds + (len(sweep.lrs) * sweep.fraction if sweep else 0)  # a sweep's runs count in the minutes
        per_step = [v.steps * runs * seconds_per_step(v.model, cfg, data, device) for v in variants]
        log("seconds per step: " + ", ".join(f"{v.name} {s / v.steps / runs:.3f}" for v, s in zip(variants, per_step)))
        spent = (time.perf_counter() - t_start) / 60
        steps = steps_for_minutes(per_step, max(minutes - spent, 0.1), cfg)
    steps = max(1, round(steps * scale))
    log(f"experiment {name}: {len(variants)} variants x {seeds} seed(s), {steps} steps x {cfg.tokens_per_step:,} "
        f"tokens per full variant, into {out}")
    sweep_record = None
    if sweep is not None:
        variants, sweep_record = _sweep(variants, out, cfg, steps, sweep, overwrite, console, log)
    per_seed = [_run_seed(variants, out, cfg, steps, seed, overwrite, console, log)
                for seed in range(cfg.seed, cfg.seed + seeds)]
    result = dict(experiment=name, question=exp.question, command=command, steps=steps,
                  tokens_per_step=cfg.tokens_per_step, seed=cfg.seed, seeds=list(range(cfg.seed, cfg.seed + seeds)),
                  device=str(device), machine=machine(), wall_seconds=time.perf_counter() - t_start,
                  train_config=variant_config(cfg, steps).to_dict(),
                  rows=aggregate([summarize(curves) for curves in per_seed]),
                  variants=mean_curves(per_seed), per_seed=per_seed, lr_sweep=sweep_record)
    write_results(result, out)
    log(f"results written to {out / 'results.md'}")
    return result


def _sweep(variants: list[Variant], out: Path, cfg: TrainConfig, steps: int, sweep: SweepConfig, overwrite: bool,
           console, log) -> tuple[list[Variant], dict]:
    """Each variant's learning rate from short runs on the first seed -> the tuned variants, the record."""
    n = sweep.steps(steps)

    def final_loss(v: Variant, lr: float) -> float | None:
        log(f"lr sweep: {v.name} at lr {format_lr(lr)}, {n} steps")
        curve = _run_seed([v], out / "sweep" / lr_folder(lr), cfg, n, cfg.seed, overwrite, console, log)[0]
        return curve["points"][-1]["val_loss"] if curve["points"] else None

    tuned, record = tune(variants, sweep, final_loss)
    log("lr sweep chose: " + ", ".join(f"{name} {format_lr(r['chosen'])}" for name, r in record.items()))
    return tuned, dict(lrs=list(sweep.lrs), fraction=sweep.fraction, steps=n, seed=cfg.seed, variants=record)


def check_variants(variants: list[Variant]) -> None:
    """Names are unique; starts and teachers name earlier variants (the runner trains in order)."""
    seen: set[str] = set()
    for v in variants:
        for ref in (v.start.variant if v.start else None, v.distill.teacher if v.distill else None):
            if ref is not None and ref not in seen:
                raise ValueError(f"variant {v.name!r} starts from or learns from {ref!r}, which is not an earlier variant")
        if v.name in seen:
            raise ValueError(f"two variants are named {v.name!r}")
        seen.add(v.name)
    if all(v.stage for v in variants):
        raise ValueError("every variant is a stage: nothing to compare")


def _run_seed(variants: list[Variant], out: Path, cfg: TrainConfig, steps: int, seed: int, overwrite: bool,
              console, log) -> list[dict]:
    """Every variant for one seed, in order -> their curves."""
    done: dict[str, tuple[Path, TrainConfig, dict]] = {}  # variant -> its run folder, config, curve
    for v in variants:
        run_dir = out / "runs" / v.name if seed == 0 else out / "runs" / f"seed-{seed}" / v.name
        start = done[v.start.variant] if v.start else None
        run_cfg = _run_config(v, cfg, steps, seed, out, start)
        _train_variant(v, run_dir, run_cfg, start, done, overwrite, console, log)
        curve = variant_curve(run_dir)
        if v.start is not None and v.start.continues:
            curve["points"] = _after(curve["points"], start[2]["points"][-1])
        done[v.name] = run_dir, run_cfg, dict(
            name=v.name, description=v.description, stage=v.stage, seed=seed, start=v.start and v.start.variant,
            teacher=v.distill and v.distill.teacher, corpus=v.corpus, **curve)
    return [done[v.name][2] for v in variants]


def _run_config(v: Variant, cfg: TrainConfig, steps: int, seed: int, out: Path, start) -> TrainConfig:
    """The variant's TrainConfig: its share of the steps, the seed, its corpus and changes; a
    continuing variant reads the batches after its start's and ends where the total ends."""
    first_batch, v_steps = 0, max(1, round(v.steps * steps))
    if v.start is not None and v.start.continues:
        start_cfg = start[1]
        first_batch = start_cfg.first_batch + start_cfg.max_steps * start_cfg.grad_accum
        done_steps = first_batch // cfg.grad_accum
        v_steps = max(1, round((done_steps / steps + v.steps) * steps) - done_steps)
    data = cfg.data
    if v.corpus is not None:
        from moekit.experiments.corpora import corpus_folder

        data = dataclasses.replace(cfg.data, sources=[str(corpus_folder(v.corpus, out / "corpora"))])
    run_cfg = dataclasses.replace(variant_config(cfg, v_steps), seed=seed, first_batch=first_batch, data=data,
                                  init=str(start[0]) if start else None, loss="distill" if v.distill else "lm")
    return TrainConfig.from_dict({**run_cfg.to_dict(), **v.train})


def _train_variant(v: Variant, run_dir: Path, run_cfg: TrainConfig, start, done: dict, overwrite: bool,
                   console, log) -> None:
    """Train (or resume, or reuse) one variant's run."""
    from moekit.training.loop import resolve_device, train

    model, extra = _first_model(v, run_cfg, start, done)
    action = _plan(run_dir, run_cfg, model if isinstance(model, ModelConfig) else model.cfg, overwrite)
    if action == "reuse":
        log(f"reusing the finished run {run_dir}")
        return
    log(f"{'resuming' if action == 'resume' else 'training'} {v.name} (seed {run_cfg.seed}): {v.description}")
    if v.distill is not None:
        from moekit.experiments.stages import distill_loss

        extra["loss_fn"] = distill_loss(v.distill, done[v.distill.teacher][0], resolve_device(run_cfg.device))
    result = train(run_cfg, model, run_dir, resume=action == "resume", console=console, **extra)
    if result.status == "interrupted":  # Ctrl-C: the variant is checkpointed; stop here, not at the next
        raise KeyboardInterrupt


def _first_model(v: Variant, run_cfg: TrainConfig, start, done: dict):
    """A ModelConfig for a fresh variant; else the start's model (transformed) with the start's
    tokenizer and, for an MoE, the routing-health hook (top-1 agreement with the first router)."""
    if v.start is None:
        return v.model, {}
    from moekit.adapt.health import RouterDrift
    from moekit.data.dataset import prepare_data, train_batch
    from moekit.data.tokenizer import load_tokenizer
    from moekit.experiments.stages import start_model
    from moekit.training.run import TOKENIZER_FILE

    batches = []
    if v.start.transform is not None:  # a transform may look at data (Switch's expert frequencies)
        tokenizer = load_tokenizer(start[0] / TOKENIZER_FILE)
        data = prepare_data(run_cfg.data, run_cfg.cache_dir, tokenizer=tokenizer, log=lambda s: None)
        batches = [train_batch(data.train, run_cfg.batch_size, run_cfg.seq_len, run_cfg.seed, i) for i in range(4)]
    model, tokenizer = start_model(v.start, start[0], run_cfg.seed, batches)
    _check_declared(v, model.cfg)
    extra = dict(tokenizer=tokenizer)
    if model.moe_layers():
        extra["on_eval"] = RouterDrift(model)
    return model, extra


def _check_declared(v: Variant, cfg: ModelConfig) -> None:
    """The registry's ``model`` (used for timing and shown in tables) is what the start gives."""
    declared = dataclasses.replace(v.model, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len)
    assert declared.to_dict() == cfg.to_dict(), f"{v.name}: the start gives another model than declared"


def _after(points: list[dict], end: dict) -> list[dict]:
    """A continuing run's points, counted from where its start ended."""
    keys = ("step", "tokens", "flops", "train_seconds")
    return [{**p, **{k: p[k] + end[k] for k in keys}} for p in points]


__all__ = ["run_experiment", "check_variants", "seconds_per_step", "steps_for_minutes", "variant_config", "EVALS_PER_RUN"]
