"""Training MoE language models: the loop, optimizer, checkpoints, metrics, and run folders.

    from moekit.training import TrainConfig, train, load_run
    result = train(TrainConfig(max_steps=100), get_preset("tiny-moe"), "runs/x")
    train(cfg, model, "runs/ft", tokenizer=tok, loss_fn=my_loss, param_filter=lambda n, p: "experts" in n)
    run = load_run("runs/x")          # model, configs, tokenizer; run.validation_batches()

The run folder's layout is in ``moekit/training/run.py``; the README's "Training" section has the CLI.
"""

from moekit.data.dataset import DataConfig
from moekit.training.checkpoint import CheckpointError, find_checkpoint, list_checkpoints, load_checkpoint
from moekit.training.config import TrainConfig
from moekit.training.loop import (
    EvalResult,
    LossFn,
    NonFiniteLossError,
    ParamFilter,
    TrainResult,
    evaluate,
    next_token_loss,
    resume_run,
    train,
    train_step,
)
from moekit.training.metrics import LayerRouting, read_metrics
from moekit.training.plots import plot_run
from moekit.training.run import LoadedRun, load_run

__all__ = [
    "TrainConfig",
    "DataConfig",
    "train",
    "resume_run",
    "train_step",
    "evaluate",
    "next_token_loss",
    "LossFn",
    "ParamFilter",
    "TrainResult",
    "EvalResult",
    "NonFiniteLossError",
    "CheckpointError",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "LayerRouting",
    "read_metrics",
    "plot_run",
    "LoadedRun",
    "load_run",
]
