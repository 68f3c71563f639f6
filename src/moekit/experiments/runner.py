"""``run_experiment``: train every variant of an experiment on the same data, batches and
token budget (equal tokens, not equal time), then write the results.

    OUT/runs/VARIANT/   an ordinary run folder per variant (moekit eval/analyze work on it)
    OUT/results.md      the results table, the command, the budget
    OUT/results.json    every number, including each variant's curve
    OUT/loss.png        validation loss vs tokens, vs training FLOPs, vs training seconds
    OUT/routing.png     max_violation, dead experts and dropped fraction over training

The budget is ``steps`` optimizer steps per variant; without it, ``minutes`` of the whole
experiment are turned into steps by timing a few steps of every variant first (so the
variants still get equal tokens). ``scale`` multiplies the steps. A variant whose run folder
already holds a finished run with the same configs is reused, so an interrupted experiment
continues where it stopped. Ctrl-C checkpoints the variant in training and stops the whole
experiment (KeyboardInterrupt; the CLI exits 130) without writing results.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

from moekit.errors import UsageError
from moekit.experiments.registry import Variant, get_experiment
from moekit.experiments.results import summarize, variant_curve, write_results
from moekit.training.config import TrainConfig

EVALS_PER_RUN = 8  # validation points per variant (plus the one at step 0)


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
    return dataclasses.replace(cfg, max_steps=steps, time_budget=None, eval_every=max(1, steps // EVALS_PER_RUN),
                               ckpt_every=steps, keep_last=1)


def _same_run(run_dir: Path, cfg: TrainConfig, model_cfg) -> bool:
    """The folder holds a run of exactly these configs (the saved vocabulary follows the tokenizer)."""
    from moekit.training.run import read_run_configs

    saved_cfg, saved_model = read_run_configs(run_dir)
    same_model = dataclasses.replace(model_cfg, vocab_size=saved_model.vocab_size).to_dict() == saved_model.to_dict()
    return same_model and saved_cfg.to_dict() == cfg.to_dict()


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
                   minutes: float = 10.0, scale: float = 1.0, overwrite: bool = False,
                   variants: list[Variant] | None = None, command: str = "", console=None,
                   log: Callable[[str], None] = print) -> dict:
    """Train the experiment's variants into ``out`` and write its results; returns them."""
    from rich.console import Console

    from moekit.data.dataset import check_length, prepare_data
    from moekit.training.loop import resolve_device, train

    exp = get_experiment(name)
    variants = variants or exp.variants()
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if not (minutes > 0 and scale > 0):
        raise UsageError(f"--minutes and --scale must be > 0, got {minutes} and {scale}")
    out, t_start = Path(out), time.perf_counter()
    console = console or Console(stderr=True)
    device = resolve_device(cfg.device)
    data = prepare_data(cfg.data, cfg.cache_dir, log=log)
    check_length(data, cfg.seq_len)
    if steps is None:
        per_step = [seconds_per_step(v.model, cfg, data, device) for v in variants]
        log("seconds per step: " + ", ".join(f"{v.name} {s:.3f}" for v, s in zip(variants, per_step)))
        spent = (time.perf_counter() - t_start) / 60
        steps = steps_for_minutes(per_step, max(minutes - spent, 0.1), cfg)
    steps = max(1, round(steps * scale))
    run_cfg = variant_config(cfg, steps)
    log(f"experiment {name}: {len(variants)} variants x {steps} steps x {cfg.tokens_per_step:,} tokens into {out}")
    curves = []
    for v in variants:
        run_dir = out / "runs" / v.name
        action = _plan(run_dir, run_cfg, v.model, overwrite)
        if action == "reuse":
            log(f"reusing the finished run {run_dir}")
        else:
            log(f"{'resuming' if action == 'resume' else 'training'} {v.name}: {v.description}")
            result = train(run_cfg, v.model, run_dir, resume=action == "resume", console=console)
            if result.status == "interrupted":  # Ctrl-C: the variant is checkpointed; stop here, not at the next
                raise KeyboardInterrupt
        curves.append(dict(name=v.name, description=v.description, **variant_curve(run_dir)))
    result = dict(experiment=name, question=exp.question, command=command, steps=steps,
                  tokens_per_step=cfg.tokens_per_step, seed=cfg.seed, device=str(device), machine=machine(),
                  wall_seconds=time.perf_counter() - t_start, train_config=run_cfg.to_dict(),
                  rows=summarize(curves), variants=curves)
    write_results(result, out)
    log(f"results written to {out / 'results.md'}")
    return result


__all__ = ["run_experiment", "seconds_per_step", "steps_for_minutes", "variant_config", "EVALS_PER_RUN"]
