"""The training loop: ``train()`` reads top to bottom over ``train_step``, ``evaluate``,
``save_checkpoint`` and ``log_metrics``.

A run stops at ``max_steps``, when ``time_budget`` minutes are spent, on Ctrl-C (after the
current step, with a checkpoint), or on a non-finite loss or gradient (without a checkpoint,
so the last good one stays the newest). Everything a resumed run needs is in the checkpoint:
weights and balancing biases, optimizer moments, step, time spent and RNG states; the data
position is the step itself (``train_batch`` is a pure function of seed and index). So 20
steps straight and 10 + resume + 10 give the same losses. The run folder is described in
``moekit/training/run.py``.

The trainer is a seam: ``train`` takes a model config or an existing model, a loss function
(``LossFn``) and a parameter filter (``ParamFilter``), so fine-tuning, upcycling and
distillation are callers of this loop, not copies of it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from torch import nn

from moekit.config import ModelConfig
from moekit.data.dataset import TokenData, check_length, prepare_data, train_batch, validation_batches
from moekit.data.tokenizer import TextTokenizer, load_tokenizer
from moekit.errors import UsageError
from moekit.model import LossParts, ModelOutput, MoETransformer, lm_loss
from moekit.training.checkpoint import find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from moekit.training.config import TrainConfig
from moekit.training.metrics import LayerRouting, MetricsLog, aggregate_routing
from moekit.training.optim import build_optimizer, lr_at, set_lr
from moekit.training.plots import plot_run
from moekit.training.report import Reporter, routing_table, summary_table
from moekit.training.run import TOKENIZER_FILE, is_run_dir, write_run_files

if TYPE_CHECKING:
    from moekit.distributed.mesh import DistContext


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped without saving."""

    def __init__(self, step: int, value: float, checkpoint: Path | None):
        last = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite loss or gradient ({value}) at step {step}; stopped without saving: {last}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class RunState:
    """The counters a checkpoint restores besides weights, optimizer and RNG."""

    step: int = 0  # optimizer steps done
    elapsed: float = 0.0  # seconds of training so far (evaluations and checkpoints included)
    tokens: int = 0  # training tokens consumed
    best_val: float | None = None
    initial_val: float | None = None  # validation loss before the first step


@dataclass
class StepResult:
    loss: float  # what was backpropagated: lm + aux
    lm_loss: float
    aux_loss: float
    grad_norm: float
    max_violation: list[float]  # per MoE layer, on this step's last micro-batch

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class EvalResult:
    loss: float
    ppl: float
    routing: list[LayerRouting]


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # done | budget | interrupted
    step: int
    tokens: int
    train_seconds: float  # in train steps, this session
    tokens_per_s: float  # training throughput this session
    initial_val_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    checkpoint: Path
    routing: list[LayerRouting]


LossFn = Callable[[ModelOutput, torch.Tensor], LossParts]
"""``loss_fn(out, batch)``: the model's output on ``batch[:, :-1]`` and the micro-batch [B, S+1]
itself -> ``LossParts`` (``total`` is backpropagated). Called outside autocast, with grad."""

ParamFilter = Callable[[str, nn.Parameter], bool]
"""``param_filter(name, parameter)``: True = train it. The others get ``requires_grad=False``,
stay out of the optimizer and are never changed (the balancing bias is a buffer: it still moves)."""


def next_token_loss(out: ModelOutput, batch: torch.Tensor) -> LossParts:
    """The default loss: next-token cross-entropy on ``batch[:, 1:]`` plus the balancing losses."""
    return lm_loss(out, batch[:, 1:])


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model: MoETransformer, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor],
               cfg: TrainConfig, lr: float, device: torch.device, loss_fn: LossFn | None = None,
               dist: DistContext | None = None) -> StepResult:
    """One optimizer step over ``batches`` (micro-batches [B, S+1], gradients accumulated).

    ``loss_fn`` (default ``next_token_loss``: the LM loss plus the balancing losses) gives what
    is backpropagated; the aux-loss-free bias moves once, after the optimizer step. Nothing is
    updated when the loss or gradient norm is not finite.

    ``dist`` (a model ``parallelize``d over several ranks): every rank gets the same global
    ``batches`` and trains on its rows of each; the losses, the gradient norm and the expert
    loads are all-reduced, so every rank reports and does what one process would.
    """
    loss_fn = loss_fn or next_token_loss
    model.train()
    sums = torch.zeros(3, device=device)  # total, lm, aux: summed over micro-batches, one sync at the end
    for batch in batches:
        batch = _rows(batch, dist).to(device, non_blocking=True)
        with _autocast(cfg.precision, device):
            out = model(batch[:, :-1])
        parts = loss_fn(out, batch)
        (parts.total / len(batches)).backward()
        sums += torch.stack([parts.total.detach(), parts.lm.detach(), parts.aux.detach()])
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = _clip_grad_norm(model, max_norm, dist)
    total, lm, aux = (_mean_over_ranks(sums, dist) / len(batches)).tolist()
    result = StepResult(total, lm, aux, grad_norm, [s.max_violation for s in model.routing_stats() if s])
    if result.finite:
        set_lr(optimizer, lr)
        optimizer.step()
        _sync_balancing_state(model, dist)
        model.update_expert_bias()
    optimizer.zero_grad(set_to_none=True)
    return result


# Single process unless a DistContext spanning several ranks is given; torch.distributed and
# FSDP are imported only then (``moekit train`` start-up stays as it was).
def _rows(batch: torch.Tensor, dist: DistContext | None) -> torch.Tensor:
    return dist.shard_rows(batch) if dist is not None and dist.distributed else batch


def _clip_grad_norm(model: nn.Module, max_norm: float, dist: DistContext | None) -> float:
    if dist is None or not dist.distributed:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    from moekit.distributed.parallelize import clip_grad_norm_

    return clip_grad_norm_(model, max_norm, dist)


def _mean_over_ranks(t: torch.Tensor, dist: DistContext | None) -> torch.Tensor:
    if dist is None or not dist.distributed:
        return t
    from moekit.distributed.parallelize import all_reduce_mean

    return all_reduce_mean(t, dist)


def _sync_balancing_state(model: nn.Module, dist: DistContext | None) -> None:
    if dist is not None and dist.distributed:
        from moekit.distributed.parallelize import sync_balancing_state

        sync_balancing_state(model, dist)


@torch.no_grad()
def evaluate(model: MoETransformer, batches: list[torch.Tensor], precision: str = "fp32") -> EvalResult:
    """Token-weighted mean validation cross-entropy, perplexity, and routing over all batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, n, stats = 0.0, 0, []
    for batch in batches:
        batch = batch.to(device)
        with _autocast(precision, device):
            out = model(batch[:, :-1])
        nll += float(lm_loss(out, batch[:, 1:]).lm) * batch[:, 1:].numel()
        n += batch[:, 1:].numel()
        stats.append(model.routing_stats())
    model.train(was_training)
    loss = nll / n
    return EvalResult(loss, math.exp(min(loss, 50.0)), aggregate_routing(stats, model.cfg.moe_layer_ids))


class _StopFlag:
    """Ctrl-C sets ``requested`` (the loop then checkpoints and returns); a second Ctrl-C
    gets the previous handler, i.e. an immediate KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum=None, frame=None) -> None:
        self.requested = True
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    @contextlib.contextmanager
    def installed(self):
        self._previous = None
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only
            return
        self._previous = signal.signal(signal.SIGINT, self.handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name} asked for, but torch sees no CUDA device")
    return torch.device(name)


def fit_model_config(model_cfg: ModelConfig, tokenizer: TextTokenizer, seq_len: int) -> ModelConfig:
    """The model's vocabulary follows the tokenizer; its context must hold a training sequence."""
    if seq_len > model_cfg.max_seq_len:
        raise UsageError(f"seq_len {seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}: "
                         f"lower --seq-len or --set max_seq_len={seq_len}")
    return replace(model_cfg, vocab_size=tokenizer.vocab_size)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def log_metrics(log: MetricsLog, reporter: Reporter, state: RunState, res: StepResult, lr: float,
                step_s: float, cfg: TrainConfig) -> None:
    rec = dict(kind="train", step=state.step, loss=res.loss, lm_loss=res.lm_loss, aux_loss=res.aux_loss, lr=lr,
               grad_norm=res.grad_norm, tokens=state.tokens, tokens_per_s=cfg.tokens_per_step / step_s,
               elapsed=state.elapsed, max_violation=res.max_violation)
    log.write(rec)
    reporter.step(rec)


def _log_eval(log: MetricsLog, state: RunState, ev: EvalResult) -> None:
    log.write(dict(kind="eval", step=state.step, val_loss=ev.loss, val_ppl=ev.ppl, elapsed=state.elapsed,
                   routing=[r.to_dict() for r in ev.routing]))
    if state.best_val is None or ev.loss < state.best_val:
        state.best_val = ev.loss


def _checkpoint(run_dir: Path, model, optimizer, state: RunState, device, cfg: TrainConfig,
                val_loss: float | None) -> Path:
    payload = {"run": asdict(state), "optimizer": optimizer.state_dict(), "rng": _rng_state(device)}
    path = save_checkpoint(run_dir, model, {**payload, "step": state.step}, val_loss=val_loss)
    prune_checkpoints(run_dir, cfg.keep_last)
    return path


@dataclass
class _Session:
    """What one call of ``train`` works with; the loop's steps read and update it."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    data: TokenData
    val_batches: list[torch.Tensor]
    log: MetricsLog
    state: RunState
    last_ckpt: Path | None = None
    ckpt_step: int | None = None
    ev: EvalResult | None = None  # the latest evaluation, made at step ``ev_step``
    ev_step: int | None = None
    step_seconds: float = 0.0  # in train steps, this session
    session_tokens: int = 0

    def final_val(self) -> float | None:
        """The validation loss at the current step, if it was evaluated there."""
        return self.ev.loss if self.ev is not None and self.ev_step == self.state.step else None


def train(cfg: TrainConfig, model: ModelConfig | nn.Module, run_dir: str | Path, *, resume: bool = False,
          console: Console | None = None, stop_after: int | None = None, loss_fn: LossFn = next_token_loss,
          param_filter: ParamFilter | None = None, tokenizer: TextTokenizer | None = None) -> TrainResult:
    """Train ``model`` on ``cfg.data`` into ``run_dir`` (resume: continue its last checkpoint).

    ``model`` is a ``ModelConfig`` (a fresh model is built, its vocabulary fitted to the
    tokenizer) or an existing ``MoETransformer`` to go on training (fine-tuning, upcycling,
    distillation: pass its ``tokenizer`` too, and a ``loss_fn`` / ``param_filter`` if needed).
    The defaults are plain pre-training: every parameter, next-token loss.
    ``stop_after`` pauses after that many total steps, exactly as Ctrl-C would (a checkpoint,
    status "interrupted"): for schedules split over sessions, and for tests of resume.
    Raises ``UsageError`` for bad input and ``NonFiniteLossError`` if training diverges.
    """
    console = console or Console(soft_wrap=True)  # long paths stay on one line in logs
    say = lambda text: console.print(text, markup=False, highlight=False)  # noqa: E731  (paths may hold [ ])
    run_dir = Path(run_dir)
    if not resume and (run_dir / "checkpoints").exists():
        raise UsageError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, or choose another --out")
    device = resolve_device(cfg.device)

    # 1. Data, model, optimizer; on resume, the run's tokenizer and last checkpoint.
    saved_tok = load_tokenizer(run_dir / TOKENIZER_FILE) if resume else tokenizer
    data = prepare_data(cfg.data, cfg.cache_dir, tokenizer=saved_tok, log=say)
    check_length(data, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    model = _build_model(model, data.tokenizer, cfg.seq_len).to(device)
    freeze_parameters(model, param_filter)
    optimizer = build_optimizer(model, cfg)
    state, last_ckpt = RunState(), None
    if resume:
        state, last_ckpt = _restore(run_dir, model, optimizer, device)
        say(f"resuming {run_dir} from step {state.step} ({last_ckpt.name})")
    write_run_files(run_dir, cfg, model.cfg, data.tokenizer)
    val_batches = validation_batches(data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    log = MetricsLog(run_dir, resume_step=state.step if resume else None)
    s = _Session(cfg, run_dir, device, model, optimizer, loss_fn, data, val_batches, log, state,
                 last_ckpt, ckpt_step=state.step if resume else None)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"training {model.num_params() / 1e6:.1f}M parameters"
        + (f" ({trained / 1e6:.1f}M trainable)" if trained != model.num_params() else "")
        + f" on {device}, {cfg.tokens_per_step:,} tokens/step, into {run_dir}")

    # 2. The loop, then the end: a final evaluation (unless interrupted) and checkpoint.
    try:
        status = _run_loop(s, console, stop_after)
        if status != "interrupted" and s.ev_step != state.step:
            _evaluate_and_log(s)
        if s.ckpt_step != state.step:
            _save(s)
        log.write(dict(kind="end", step=state.step, status=status, val_loss=s.final_val(), tokens=state.tokens,
                       elapsed=state.elapsed))
    finally:
        log.close()

    # 3. The plot and the summary.
    plot = plot_run(run_dir)
    result = TrainResult(run_dir, status, state.step, state.tokens, s.step_seconds,
                         s.session_tokens / s.step_seconds if s.step_seconds else 0.0, state.initial_val,
                         s.final_val(), state.best_val, s.last_ckpt, s.ev.routing if s.ev is not None else [])
    _print_summary(console, result, plot)
    return result


def _build_model(model: ModelConfig | nn.Module, tokenizer: TextTokenizer, seq_len: int) -> nn.Module:
    """A fresh model for a config (vocabulary = the tokenizer's), or a given model checked to fit."""
    if isinstance(model, ModelConfig):
        return MoETransformer(fit_model_config(model, tokenizer, seq_len))
    if seq_len > model.cfg.max_seq_len:
        raise UsageError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only "
                         f"{model.cfg.vocab_size}: pass the model's own tokenizer")
    return model


def freeze_parameters(model: nn.Module, param_filter: ParamFilter | None) -> None:
    """``requires_grad=False`` on every parameter the filter rejects (None: train them all)."""
    if param_filter is None:
        return
    for name, p in model.named_parameters():
        if not param_filter(name, p):
            p.requires_grad_(False)


def _restore(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             device: torch.device) -> tuple[RunState, Path]:
    """Load the run's last checkpoint: weights, optimizer, RNG and counters."""
    path = find_checkpoint(run_dir, "last")
    saved, _ = load_checkpoint(path, model, map_location=device)
    optimizer.load_state_dict(saved["optimizer"])
    _set_rng_state(saved["rng"], device)
    return RunState(**saved["run"]), path


def _run_loop(s: _Session, console: Console, stop_after: int | None) -> str:
    """Evaluate first (on a fresh run), then step until a stop; returns the status."""
    cfg, state = s.cfg, s.state
    stop = _StopFlag()
    t_start, base_elapsed = time.perf_counter(), state.elapsed
    budget_s = cfg.time_budget * 60 if cfg.time_budget is not None else None
    with stop.installed(), Reporter(console, cfg.max_steps, state.step, cfg.log_every, budget_s) as reporter:
        if state.initial_val is None:
            state.initial_val = _evaluate_and_log(s).loss
        while True:
            state.elapsed = base_elapsed + time.perf_counter() - t_start
            status = _stop_status(state, cfg, budget_s, stop.requested, stop_after)
            if status is not None:
                return status
            lr = lr_at(state.step, state.elapsed, cfg)
            t0 = time.perf_counter()
            res = train_step(s.model, s.optimizer, _train_batches(s), cfg, lr, s.device, s.loss_fn)
            dt = time.perf_counter() - t0
            if not res.finite:
                _diverged(s, res)
            state.step += 1
            state.tokens += cfg.tokens_per_step
            s.step_seconds += dt
            s.session_tokens += cfg.tokens_per_step
            state.elapsed = base_elapsed + time.perf_counter() - t_start
            log_metrics(s.log, reporter, state, res, lr, dt, cfg)
            if state.step % cfg.eval_every == 0:
                _evaluate_and_log(s)
            if state.step % cfg.ckpt_every == 0:
                _save(s)


def _stop_status(state: RunState, cfg: TrainConfig, budget_s: float | None, interrupted: bool,
                 stop_after: int | None) -> str | None:
    """Why the loop stops before the next step (done | budget | interrupted), or None."""
    if state.step >= cfg.max_steps:
        return "done"
    if budget_s is not None and state.elapsed >= budget_s:
        return "budget"
    if interrupted or (stop_after is not None and state.step >= stop_after):
        return "interrupted"
    return None


def _train_batches(s: _Session) -> list[torch.Tensor]:
    """The next step's micro-batches: a pure function of the seed and the step."""
    cfg, first = s.cfg, s.state.step * s.cfg.grad_accum
    return [train_batch(s.data.train, cfg.batch_size, cfg.seq_len, cfg.seed, first + i) for i in range(cfg.grad_accum)]


def _diverged(s: _Session, res: StepResult) -> None:
    step = s.state.step + 1
    s.log.write(dict(kind="end", step=step, status="nonfinite", loss=res.loss, grad_norm=res.grad_norm))
    raise NonFiniteLossError(step, res.loss if not math.isfinite(res.loss) else res.grad_norm, s.last_ckpt)


def _evaluate_and_log(s: _Session) -> EvalResult:
    s.ev, s.ev_step = evaluate(s.model, s.val_batches, s.cfg.precision), s.state.step
    _log_eval(s.log, s.state, s.ev)
    return s.ev


def _save(s: _Session) -> None:
    s.last_ckpt = _checkpoint(s.run_dir, s.model, s.optimizer, s.state, s.device, s.cfg, s.final_val())
    s.ckpt_step = s.state.step


def _print_summary(console: Console, r: TrainResult, plot: Path) -> None:
    rows = {"status": r.status, "steps": r.step, "tokens": r.tokens,
            "train tokens/s (this session)": round(r.tokens_per_s)}
    if r.initial_val_loss is not None:
        rows["val loss at step 0"] = r.initial_val_loss
    if r.final_val_loss is not None:
        rows["final val loss"] = r.final_val_loss
        rows["final val perplexity"] = math.exp(min(r.final_val_loss, 50.0))
    if r.best_val_loss is not None:
        rows["best val loss"] = r.best_val_loss
    rows.update({"checkpoint": str(r.checkpoint), "plot": str(plot)})
    console.print(summary_table(rows))
    if r.routing:
        console.print(routing_table(r.routing))
    if r.status == "interrupted":
        console.print(f"interrupted at step {r.step}; resume with: moekit train --resume {r.run_dir}",
                      markup=False, highlight=False)


def resume_run(run_dir: str | Path, overrides: dict | None = None, console: Console | None = None,
               stop_after: int | None = None) -> TrainResult:
    """Continue a run from its last checkpoint with its own configs; ``overrides`` may change
    only the fields in ``RESUMABLE_FIELDS`` (more steps, a new time budget, ...)."""
    from moekit.training.config import RESUMABLE_FIELDS
    from moekit.training.run import read_run_configs

    if not is_run_dir(run_dir):
        raise UsageError(f"{run_dir} is not a moekit run folder (no train_config.json)")
    cfg, model_cfg = read_run_configs(run_dir)
    bad = sorted(set(overrides or {}) - set(RESUMABLE_FIELDS))
    if bad:
        raise UsageError(f"cannot change {', '.join(bad)} when resuming (allowed: {', '.join(RESUMABLE_FIELDS)})")
    cfg = TrainConfig.from_dict({**cfg.to_dict(), **(overrides or {})})
    return train(cfg, model_cfg, run_dir, resume=True, console=console, stop_after=stop_after)


__all__ = ["train", "resume_run", "train_step", "evaluate", "next_token_loss", "freeze_parameters", "LossFn",
           "ParamFilter", "TrainResult", "StepResult", "EvalResult",
           "NonFiniteLossError", "RunState", "resolve_device", "fit_model_config"]
