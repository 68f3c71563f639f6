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
from moekit.memory import check_fits, is_out_of_memory
from moekit.training.checkpoint import (
    SHARDED_DIR, CheckpointError, discard_after, find_checkpoint, intact_hint, load_from_run, prune_checkpoints,
    save_checkpoint, verify_checkpoint,
)
from moekit.training.config import TrainConfig
from moekit.training.metrics import LayerRouting, MetricsLog, aggregate_routing
from moekit.training.optim import apply_hyperparameters, build_optimizer, lr_at, set_lr
from moekit.training.plots import plot_run
from moekit.training.report import Reporter, routing_table, summary_table
from moekit.training.run import (
    TOKENIZER_FILE, check_new_run_dir, claim_run_dir, is_run_dir, trusted_cache_dir, write_run_files,
)

if TYPE_CHECKING:
    from moekit.distributed.mesh import DistContext, ParallelConfig


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped without saving."""

    def __init__(self, step: int, value: float, checkpoint: Path | None):
        last = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(f"non-finite loss or gradient ({value}) at step {step}; stopped without saving: {last}")
        self.step, self.checkpoint = step, checkpoint


class OutOfMemoryStop(RuntimeError):
    """A training step ran out of memory; the run stopped without saving (the folder stays as
    it was after the last checkpoint, with an ``end`` record saying why)."""

    def __init__(self, step: int, cfg: TrainConfig, n_params: int, device: torch.device, checkpoint: Path | None,
                 cause: str):
        last = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        fewer = f"--batch-size {max(1, cfg.batch_size // 2)} --grad-accum {cfg.grad_accum * 2}"
        super().__init__(
            f"out of memory at step {step} (batch {cfg.batch_size} x {cfg.seq_len} tokens, grad_accum "
            f"{cfg.grad_accum}, {n_params / 1e6:,.1f}M parameters on {device}; {cause}): use smaller micro-batches "
            f"with the same tokens per step, e.g. {fewer}; {last}")
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
    max_violation: list[float]  # per MoE layer, on this step's last micro-batch (every rank's rows)

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

EvalHook = Callable[[nn.Module, list[torch.Tensor]], dict]
"""``on_eval(model, val_batches)`` -> extra fields for the evaluation's metrics record."""

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
    routing = _global_routing(model, dist)  # logged from rank 0: the global batch's load
    result = StepResult(total, lm, aux, grad_norm, [s.max_violation for s in routing if s])
    if result.finite:
        set_lr(optimizer, lr)
        optimizer.step()
        _sync_balancing_state(model, dist)
        model.update_expert_bias()
    optimizer.zero_grad(set_to_none=True)
    return result


# Single process unless a DistContext spanning several ranks is given; torch.distributed and
# FSDP are imported only then (``moekit train`` start-up stays as it was).
def _rows(batch: torch.Tensor, dist: DistContext | None, even: bool = True) -> torch.Tensor:
    return dist.shard_rows(batch, even) if dist is not None and dist.distributed else batch


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


def _global_routing(model: MoETransformer, dist: DistContext | None) -> list:
    if dist is None or not dist.distributed:
        return model.routing_stats()
    from moekit.distributed.parallelize import global_routing_stats

    return global_routing_stats(model.routing_stats(), dist, model.moe_layers())


def _sync_balancing_state(model: nn.Module, dist: DistContext | None) -> None:
    if dist is not None and dist.distributed:
        from moekit.distributed.parallelize import sync_balancing_state

        sync_balancing_state(model, dist)


@torch.no_grad()
def evaluate(model: MoETransformer, batches: list[torch.Tensor], precision: str = "fp32",
             dist: DistContext | None = None) -> EvalResult:
    """Token-weighted mean validation cross-entropy, perplexity, and routing over all batches.
    With ``dist``, each rank evaluates its rows of every batch and the sums are all-reduced
    (the routing statistics too: expert loads over the whole batch, not this rank's)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, stats = torch.zeros(2, dtype=torch.float64), []  # nll, tokens
    for batch in batches:
        batch = _rows(batch, dist, even=False).to(device)
        with _autocast(precision, device):
            out = model(batch[:, :-1])
        n = batch[:, 1:].numel()
        sums += torch.tensor([float(lm_loss(out, batch[:, 1:]).lm) * n, n], dtype=torch.float64)
        stats.append(_global_routing(model, dist))
    model.train(was_training)
    nll, n = (_mean_over_ranks(sums, dist)).tolist()
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
    reporter.step(rec, cfg.tokens_per_step, step_s)


def _log_eval(log: MetricsLog, state: RunState, ev: EvalResult, extra: dict | None = None) -> None:
    log.write(dict(kind="eval", step=state.step, val_loss=ev.loss, val_ppl=ev.ppl, elapsed=state.elapsed,
                   routing=[r.to_dict() for r in ev.routing], **(extra or {})))
    if state.best_val is None or ev.loss < state.best_val:
        state.best_val = ev.loss


def _checkpoint(run_dir: Path, model, optimizer, state: RunState, device, cfg: TrainConfig,
                val_loss: float | None, dist: DistContext | None = None, sharded: bool = False) -> Path:
    if dist is not None and dist.distributed:
        if sharded:
            return _checkpoint_sharded(run_dir, model, optimizer, state, device, cfg, val_loss, dist)
        return _checkpoint_distributed(run_dir, model, optimizer, state, device, cfg, val_loss, dist)
    payload = {"run": asdict(state), "optimizer": optimizer.state_dict(), "rng": _rng_state(device)}
    path = save_checkpoint(run_dir, model, {**payload, "step": state.step}, val_loss=val_loss)
    prune_checkpoints(run_dir, cfg.keep_last)
    return path


def _checkpoint_sharded(run_dir: Path, model, optimizer, state: RunState, device, cfg: TrainConfig,
                        val_loss: float | None, dist: DistContext) -> Path:
    """Every rank writes its pieces with torch.distributed.checkpoint (distributed/sharded.py)."""
    import torch.distributed as torch_dist

    from moekit.distributed.sharded import optimizer_hyperparameters, save_sharded

    payload = {"run": asdict(state), "optimizer_groups": optimizer_hyperparameters(optimizer),
               "rng": _rng_state(device), "step": state.step}
    layout = {"world": dist.world, "ep": dist.ep, "dp": dist.dp}
    path = save_sharded(run_dir, model, optimizer, payload, val_loss, layout)
    if dist.is_main:
        prune_checkpoints(run_dir, cfg.keep_last)
    torch_dist.barrier()  # nobody reads or prunes checkpoints while rank 0 seals
    return path


def _checkpoint_distributed(run_dir: Path, model, optimizer, state: RunState, device, cfg: TrainConfig,
                            val_loss: float | None, dist: DistContext) -> Path:
    """Every rank gathers; rank 0 writes the single-process checkpoint (distributed/checkpoint.py):
    the consolidated export at the end of a run (or every time with ``--ckpt-format consolidated``)."""
    import torch.distributed as torch_dist

    from moekit.distributed.checkpoint import full_optimizer_state, full_state_dict, unsharded_twin

    weights, optim = full_state_dict(model, dist), full_optimizer_state(model, optimizer, dist)
    path = run_dir / "checkpoints" / f"step-{state.step:08d}"
    if dist.is_main:
        payload = {"run": asdict(state), "optimizer": optim, "rng": _rng_state(device), "step": state.step}
        path = save_checkpoint(run_dir, unsharded_twin(model, weights), payload, val_loss=val_loss)
        prune_checkpoints(run_dir, cfg.keep_last)
    torch_dist.barrier()  # nobody reads or prunes checkpoints while rank 0 writes
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
    log: MetricsLog | _NoLog
    state: RunState
    dist: DistContext
    last_ckpt: Path | None = None
    ckpt_step: int | None = None
    ev: EvalResult | None = None  # the latest evaluation, made at step ``ev_step``
    ev_step: int | None = None
    step_seconds: float = 0.0  # in train steps, this session
    session_tokens: int = 0
    on_eval: EvalHook | None = None
    sharded: bool = False  # distributed: checkpoints other than the final one are sharded (DCP)
    ckpt_sharded: bool = False  # the latest checkpoint is

    def final_val(self) -> float | None:
        """The validation loss at the current step, if it was evaluated there."""
        return self.ev.loss if self.ev is not None and self.ev_step == self.state.step else None


def train(cfg: TrainConfig, model: ModelConfig | nn.Module, run_dir: str | Path, *, resume: bool = False,
          console: Console | None = None, stop_after: int | None = None, loss_fn: LossFn = next_token_loss,
          param_filter: ParamFilter | None = None, tokenizer: TextTokenizer | None = None,
          resume_from: str | int = "last", changed: dict | None = None, check_memory: bool = True,
          check_finite: bool = True, parallel: ParallelConfig | None = None,
          on_eval: EvalHook | None = None) -> TrainResult:
    """Train ``model`` on ``cfg.data`` into ``run_dir`` (resume: continue its last checkpoint).

    ``model`` is a ``ModelConfig`` (a fresh model is built, its vocabulary fitted to the
    tokenizer) or an existing ``MoETransformer`` to go on training (fine-tuning, upcycling,
    distillation: pass its ``tokenizer`` too, and a ``loss_fn`` / ``param_filter`` if needed).
    The defaults are plain pre-training: every parameter, next-token loss. ``cfg.trainable`` and
    ``cfg.freeze`` (training/freeze.py) narrow what trains further, and print a coverage line.
    ``on_eval(model, val_batches)`` -> a dict added to every evaluation's metrics record
    (fine-tuning logs routing health there).
    ``stop_after`` pauses after that many total steps, exactly as Ctrl-C would (a checkpoint,
    status "interrupted"): for schedules split over sessions, and for tests of resume.
    A resume starts from checkpoint ``resume_from`` (later ones are moved to ``RUN/discarded/``);
    ``changed`` ({field: [old, new]}, from ``resume_run``) is recorded in the metrics.
    ``check_memory`` refuses a model that would not fit (``moekit.memory``); ``check_finite``
    refuses a checkpoint holding NaN/inf.
    Raises ``UsageError`` for bad input, ``NonFiniteLossError`` if training diverges and
    ``OutOfMemoryStop`` if a step runs out of memory.

    ``parallel`` (or a launch by torchrun): every rank runs ``train`` with the same arguments;
    the model is ``parallelize``d (expert and data parallelism, docs/distributed.md) and
    ``cfg.batch_size`` stays the global batch, split over the ranks; checkpoints are sharded
    (every rank writes its pieces, ``distributed/sharded.py``) and a finished run ends with a
    consolidated one; either kind resumes at any world size.
    """
    device = resolve_device(cfg.device)
    dist = _dist_context(parallel, model, device)
    if cfg.batch_size % dist.world:
        fits = ", ".join(str(w) for w in range(1, cfg.batch_size + 1) if cfg.batch_size % w == 0)
        raise UsageError(f"--batch-size {cfg.batch_size} (global) is not divisible by the world size {dist.world}"
                         + (f": resume this run with a world size that divides it ({fits})" if resume else ""))
    # Rank 0 alone prints, logs and writes the run folder; the others run the same steps quietly.
    console = console or Console(soft_wrap=True)  # long paths stay on one line in logs
    console = console if dist.is_main else Console(quiet=True)
    say = lambda text: console.print(text, markup=False, highlight=False)  # noqa: E731  (paths may hold [ ])
    run_dir = Path(run_dir)
    if not resume:
        check_new_run_dir(run_dir)  # a foreign folder is refused before anything is read or written

    # 1. Data, model, optimizer; on resume, the run's tokenizer and last checkpoint.
    saved_tok = load_tokenizer(run_dir / TOKENIZER_FILE) if resume else tokenizer
    with _main_rank_first(dist):  # rank 0 fills the data cache, the others then read it
        data = prepare_data(cfg.data, cfg.cache_dir, tokenizer=saved_tok, log=say)
    check_length(data, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    model = _build_model(model, data.tokenizer, cfg.seq_len, device, check_memory)
    adapted = _adapt(model, cfg, parallel)  # LoRA twins exist before a resume loads their weights
    model = model.to(device)
    freeze_parameters(model, _with_policy(param_filter, model, cfg))
    coverage = _coverage_text(model)
    # On resume the weights go into the whole model, before parallelize cuts it into pieces.
    last_ckpt, saved = _load_weights(run_dir, model, device, resume_from, check_finite) if resume else (None, None)
    model = _parallelize(model, dist, parallel)
    optimizer = build_optimizer(model, cfg)
    if resume and saved is None:  # a sharded checkpoint: read into the pieces, whatever the layout
        saved = _load_sharded(run_dir, last_ckpt, model, optimizer, device, check_finite)
    state = RunState()
    with claim_run_dir(run_dir, resume, say) if dist.is_main else contextlib.nullcontext():
        if resume:  # the lock above: one trainer per folder, until the end
            state = _restore(run_dir, saved, model, optimizer, device, dist, say)
            apply_hyperparameters(optimizer, cfg)  # the optimizer's saved betas/decay, or changed ones
            say(f"resuming {run_dir} from step {state.step} ({last_ckpt.name})")
        if dist.is_main:
            write_run_files(run_dir, cfg, model.cfg, data.tokenizer)
        val_batches = validation_batches(data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        log = MetricsLog(run_dir, resume_step=state.step if resume else None) if dist.is_main else _NoLog()
        if resume:
            log.write(dict(kind="resume", step=state.step, checkpoint=last_ckpt.name, changed=changed or {}))
        s = _Session(cfg, run_dir, device, model, optimizer, loss_fn, data, val_batches, log, state, dist,
                     last_ckpt, ckpt_step=state.step if resume else None, on_eval=on_eval,
                     sharded=dist.distributed and (parallel is None or parallel.ckpt_format == "sharded"))
        _say_start(s, say)
        if coverage:
            say(coverage)
        if adapted:
            say(adapted)

        # 2. The loop, then the end: a final evaluation (unless interrupted) and checkpoint.
        try:
            status = _run_loop(s, console, stop_after)
            if status != "interrupted" and s.ev_step != state.step:
                _evaluate_and_log(s)
            if s.ckpt_step != state.step or (status != "interrupted" and s.ckpt_sharded):
                _save(s, final=status != "interrupted")  # a finished run ends with the consolidated export
            if cfg.trainable == "lora" and dist.is_main:  # the adapters on their own (adapt/lora_io.py)
                _save_adapter(s)
            log.write(dict(kind="end", step=state.step, status=status, val_loss=s.final_val(),
                           tokens=state.tokens, elapsed=state.elapsed))
        finally:
            log.close()

    # 3. The plot and the summary.
    plot = plot_run(run_dir) if dist.is_main else run_dir / "plot.png"
    result = TrainResult(run_dir, status, state.step, state.tokens, s.step_seconds,
                         s.session_tokens / s.step_seconds if s.step_seconds else 0.0, state.initial_val,
                         s.final_val(), state.best_val, s.last_ckpt, s.ev.routing if s.ev is not None else [])
    _print_summary(console, result, plot)
    return result


def _say_start(s: _Session, say) -> None:
    model, cfg = s.model, s.cfg
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    threads = f" with {torch.get_num_threads()} CPU thread(s)" if s.device.type == "cpu" else ""
    say(f"training {model.num_params() / 1e6:.1f}M parameters"
        + (f" ({trained / 1e6:.1f}M trainable)" if trained != model.num_params() else "")
        + f" on {s.device}{threads}{_ranks_text(s.dist)}, {cfg.tokens_per_step:,} tokens/step, into {s.run_dir}")


def _build_model(model: ModelConfig | nn.Module, tokenizer: TextTokenizer, seq_len: int,
                 device: torch.device, check_memory: bool = True) -> nn.Module:
    """A fresh model for a config (vocabulary = the tokenizer's; refused if it would not fit in
    memory for training), or a given model checked to fit the data."""
    if isinstance(model, ModelConfig):
        cfg = fit_model_config(model, tokenizer, seq_len)
        # built on the CPU, then moved: the CPU must hold the weights, the device everything
        check_fits(cfg, "cpu", training=device.type == "cpu", force=not check_memory, what="the model")
        if device.type != "cpu":
            check_fits(cfg, str(device), training=True, force=not check_memory, what="the model")
        return MoETransformer(cfg)
    if seq_len > model.cfg.max_seq_len:
        raise UsageError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only "
                         f"{model.cfg.vocab_size}: pass the model's own tokenizer")
    return model


def _adapt(model: nn.Module, cfg: TrainConfig, parallel: ParallelConfig | None) -> str | None:
    """LoRA twins (``cfg.trainable == "lora"``) and expert dropout, applied to the built model
    from outside (adapt/lora.py) -> a line saying what was applied, or None."""
    if cfg.trainable != "lora" and not cfg.expert_dropout:
        return None
    if parallel is not None and parallel.ep > 1:
        raise UsageError("LoRA and expert dropout do not combine with expert parallelism (--ep) yet")
    from moekit.adapt.lora import apply_expert_dropout, apply_lora

    lines = []
    if cfg.trainable == "lora":
        lines.append(apply_lora(model, cfg.lora_config()).line())
    if cfg.expert_dropout:
        n = apply_expert_dropout(model, cfg.expert_dropout)
        lines.append(f"expert dropout {cfg.expert_dropout} in {n} MoE layer(s), training only")
    return "; ".join(lines)


def _save_adapter(s: _Session) -> None:
    from moekit.adapt.lora_io import ADAPTER_DIR, save_adapter

    save_adapter(s.model, s.run_dir / ADAPTER_DIR, s.cfg.lora_config(), step=s.state.step, init=s.cfg.init)


def _with_policy(param_filter: ParamFilter | None, model: nn.Module, cfg: TrainConfig) -> ParamFilter | None:
    """``param_filter`` narrowed by the config's fine-tuning policy (``cfg.trainable``, ``cfg.freeze``)."""
    if cfg.trainable == "all" and not cfg.freeze:
        return param_filter
    from moekit.training.freeze import select_trainable

    chosen = select_trainable(model, cfg.trainable, cfg.freeze)
    return lambda name, p: name in chosen and (param_filter is None or param_filter(name, p))


def _coverage_text(model: nn.Module) -> str | None:
    """The coverage line (trainable parameters per module kind) when anything is frozen."""
    if all(p.requires_grad for p in model.parameters()):
        return None
    from moekit.training.freeze import coverage, coverage_line

    return coverage_line(coverage(model))


def freeze_parameters(model: nn.Module, param_filter: ParamFilter | None) -> None:
    """``requires_grad=False`` on every parameter the filter rejects (None: train them all)."""
    if param_filter is None:
        return
    for name, p in model.named_parameters():
        if not param_filter(name, p):
            p.requires_grad_(False)


def _load_weights(run_dir: Path, model: nn.Module, device: torch.device, which: str | int,
                  check_finite: bool) -> tuple[Path, dict | None]:
    """Checkpoint ``which`` (default the last): its weights into ``model`` (whole, not yet
    parallelized) -> (its folder, the rest of its state). A sharded checkpoint is only found
    and verified here -> (its folder, None): ``_load_sharded`` reads it after ``parallelize``."""
    path = find_checkpoint(run_dir, which)
    if not (path / SHARDED_DIR).is_dir():
        path, saved, _ = load_from_run(run_dir, which, model, map_location=device, check_finite=check_finite)
        return path, saved
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {intact_hint(run_dir, path)}") from None
    return path, None


def _load_sharded(run_dir: Path, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                  device: torch.device, check_finite: bool) -> dict:
    """Weights and optimizer state of a sharded checkpoint into this rank's pieces (every rank
    reads the overlap of its pieces with what was saved: any world size) -> state.pt."""
    from moekit.distributed.sharded import load_sharded

    load_sharded(path, model, optimizer, check_finite)
    return torch.load(path / "state.pt", map_location=device, weights_only=True)


def _restore(run_dir: Path, saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
             dist: DistContext, say) -> RunState:
    """Optimizer (cut to this rank's pieces when distributed), RNG and counters. Later
    checkpoints are moved aside: their steps are about to be trained again."""
    if "optimizer_groups" in saved:  # sharded: the moments are loaded already, the hyperparameters here
        for group, saved_group in zip(optimizer.param_groups, saved["optimizer_groups"]):
            group.update(saved_group)
    elif dist.distributed:
        from moekit.distributed.checkpoint import load_optimizer_state

        load_optimizer_state(model, optimizer, saved["optimizer"], dist)
    else:
        optimizer.load_state_dict(saved["optimizer"])
    _set_rng_state(saved["rng"], device)
    state = RunState(**saved["run"])
    moved = discard_after(run_dir, state.step) if dist.is_main else []
    if moved:
        say(f"moved {len(moved)} later checkpoint(s) ({', '.join(p.name for p in moved)}) to "
            f"{moved[0].parent}: the run continues from step {state.step}")
    return state


def _dist_context(parallel: ParallelConfig | None, model: ModelConfig | nn.Module, device: torch.device) -> DistContext:
    """One process unless ``parallel`` is given or torchrun launched this one."""
    from moekit.distributed.mesh import init_mesh, launched_by_torchrun, single_process

    if parallel is None and not launched_by_torchrun():
        return single_process(device)
    from moekit.distributed.mesh import ParallelConfig

    cfg = model if isinstance(model, ModelConfig) else model.cfg
    return init_mesh(parallel or ParallelConfig(), cfg.moe.num_experts if cfg.moe else None, device.type)


def _parallelize(model: nn.Module, dist: DistContext, parallel: ParallelConfig | None) -> nn.Module:
    if not dist.distributed:
        return model
    from moekit.distributed.mesh import ParallelConfig
    from moekit.distributed.parallelize import parallelize

    return parallelize(model, dist, parallel or ParallelConfig())


@contextlib.contextmanager
def _main_rank_first(dist: DistContext):
    """Rank 0 runs the block first; the others wait, then run it (reading what it cached)."""
    if not dist.distributed:
        yield
        return
    import torch.distributed as torch_dist

    if not dist.is_main:
        torch_dist.barrier()
    yield
    if dist.is_main:
        torch_dist.barrier()


def _ranks_text(dist: DistContext) -> str:
    return f" x {dist.world} ranks (ep {dist.ep}, dp {dist.dp})" if dist.distributed else ""


class _NoLog:
    """The metrics log of ranks other than 0: rank 0 writes the run's."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _run_loop(s: _Session, console: Console, stop_after: int | None) -> str:
    """Evaluate first (on a fresh run), then step until a stop; returns the status."""
    cfg, state = s.cfg, s.state
    stop = _StopFlag()
    t_start, base_elapsed = time.perf_counter(), state.elapsed
    budget_s = cfg.time_budget * 60 if cfg.time_budget is not None else None
    with stop.installed(), Reporter(console, cfg.max_steps, state.step, cfg.log_every, budget_s) as reporter:
        if state.initial_val is None:
            b = s.val_batches[0].shape
            console.print(f"evaluating the untrained model on {len(s.val_batches)} validation batch(es) of "
                          f"{b[0]} x {b[1] - 1} tokens", markup=False, highlight=False)
            state.initial_val = _evaluate_and_log(s).loss
        while True:
            state.elapsed = base_elapsed + time.perf_counter() - t_start
            requested = _agree(s.dist, state, stop.requested)
            status = _stop_status(state, cfg, budget_s, requested, stop_after)
            if status is not None:
                return status
            lr = lr_at(state.step, state.elapsed, cfg)
            t0 = time.perf_counter()
            try:
                res = train_step(s.model, s.optimizer, _train_batches(s), cfg, lr, s.device, s.loss_fn, s.dist)
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                _out_of_memory(s, e)
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


def _agree(dist: DistContext, state: RunState, requested: bool) -> bool:
    """Ranks stop at the same step and schedule by the same clock: the latest elapsed time and
    any rank's Ctrl-C hold for all (else one would wait forever in the next collective)."""
    if not dist.distributed:
        return requested
    import torch.distributed as torch_dist

    t = torch.tensor([state.elapsed, float(requested)], dtype=torch.float64)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    state.elapsed = float(t[0])
    return bool(t[1])


def _train_batches(s: _Session) -> list[torch.Tensor]:
    """The next step's micro-batches: a pure function of the seed and the step."""
    cfg = s.cfg
    first = cfg.first_batch + s.state.step * cfg.grad_accum
    return [train_batch(s.data.train, cfg.batch_size, cfg.seq_len, cfg.seed, first + i) for i in range(cfg.grad_accum)]


def _out_of_memory(s: _Session, e: RuntimeError) -> None:
    """Free what the failed step held, record why the run ended, and stop without saving: the
    weights may be half-updated if the optimizer step itself ran out, so the last checkpoint
    stays the newest."""
    step = s.state.step + 1
    s.optimizer.zero_grad(set_to_none=True)
    cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    del e
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    s.log.write(dict(kind="end", step=step, status="oom", error=cause))
    raise OutOfMemoryStop(step, s.cfg, s.model.num_params(), s.device, s.last_ckpt, cause) from None


def _diverged(s: _Session, res: StepResult) -> None:
    step = s.state.step + 1
    s.log.write(dict(kind="end", step=step, status="nonfinite", loss=res.loss, grad_norm=res.grad_norm))
    raise NonFiniteLossError(step, res.loss if not math.isfinite(res.loss) else res.grad_norm, s.last_ckpt)


def _evaluate_and_log(s: _Session) -> EvalResult:
    s.ev, s.ev_step = evaluate(s.model, s.val_batches, s.cfg.precision, s.dist), s.state.step
    _log_eval(s.log, s.state, s.ev, s.on_eval(s.model, s.val_batches) if s.on_eval is not None else None)
    return s.ev


def _save(s: _Session, final: bool = False) -> None:
    sharded = s.sharded and not final
    s.last_ckpt = _checkpoint(s.run_dir, s.model, s.optimizer, s.state, s.device, s.cfg, s.final_val(), s.dist,
                              sharded)
    s.ckpt_step, s.ckpt_sharded = s.state.step, sharded


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
    console.print(summary_table(rows))
    # paths below the table, whole: a table cell would cut them at the console's width in logs
    console.print(f"checkpoint {r.checkpoint}\nplot {plot}", markup=False, highlight=False, soft_wrap=True)
    if r.routing:
        console.print(routing_table(r.routing))
    if r.status == "interrupted":
        console.print(f"interrupted at step {r.step}; resume with: moekit train --resume {r.run_dir}",
                      markup=False, highlight=False)


def resume_run(run_dir: str | Path, overrides: dict | None = None, console: Console | None = None,
               stop_after: int | None = None, *, checkpoint: str | int = "last", change_optimizer: bool = False,
               check_memory: bool = True, check_finite: bool = True,
               parallel: ParallelConfig | None = None) -> TrainResult:
    """Continue a run from its last checkpoint (or ``checkpoint``) with its own configs.

    ``overrides`` may change only the fields in ``RESUMABLE_FIELDS`` (more steps, a new time
    budget, ...), and with ``change_optimizer`` those in ``OPTIMIZER_FIELDS`` too (a lower
    learning rate after a divergence: the usual remedy); what changed is recorded in the
    metrics (a ``resume`` record). A ``cache_dir`` from the run folder is used only if it is
    inside the run folder or the cache root.
    """
    from moekit.training.config import OPTIMIZER_FIELDS, RESUMABLE_FIELDS
    from moekit.training.run import read_run_configs

    console = console or Console(soft_wrap=True)
    if not is_run_dir(run_dir):
        raise UsageError(f"{run_dir} is not a moekit run folder (no train_config.json)")
    cfg, model_cfg = read_run_configs(run_dir)
    if cfg.loss != "lm":  # the loss function is code, not in the folder: never continue with another
        raise UsageError(f"{run_dir} was trained with the {cfg.loss} loss (moekit distill), which --resume cannot "
                         "rebuild yet: start a new distillation instead")
    overrides = dict(overrides or {})
    allowed = RESUMABLE_FIELDS + (OPTIMIZER_FIELDS if change_optimizer else ())
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise UsageError(f"cannot change {', '.join(bad)} when resuming (allowed: {', '.join(RESUMABLE_FIELDS)}; "
                         f"and {', '.join(OPTIMIZER_FIELDS)} with --change-optimizer)")
    if "cache_dir" not in overrides:
        say = lambda text: console.print(text, markup=False, highlight=False)  # noqa: E731
        overrides["cache_dir"] = trusted_cache_dir(run_dir, cfg.cache_dir, say)
    old = cfg.to_dict()
    cfg = TrainConfig.from_dict({**old, **overrides})
    changed = {k: [old[k], v] for k, v in overrides.items() if k in OPTIMIZER_FIELDS and v != old[k]}
    return train(cfg, model_cfg, run_dir, resume=True, console=console, stop_after=stop_after,
                 resume_from=checkpoint, changed=changed, check_memory=check_memory, check_finite=check_finite,
                 parallel=parallel)


__all__ = ["train", "resume_run", "train_step", "evaluate", "next_token_loss", "freeze_parameters", "LossFn", "EvalHook",
           "ParamFilter", "TrainResult", "StepResult", "EvalResult",
           "NonFiniteLossError", "OutOfMemoryStop", "RunState", "resolve_device", "fit_model_config"]
