"""Training MoE language models: the loop, optimizer, checkpoints, metrics, and run folders.

    from moekit.training import TrainConfig, train, load_run
    result = train(TrainConfig(max_steps=100), get_preset("tiny-moe"), "runs/x")
    train(cfg, model, "runs/ft", tokenizer=tok, loss_fn=my_loss, param_filter=lambda n, p: "experts" in n)
    run = load_run("runs/x")          # model, configs, tokenizer; run.validation_batches()

The run folder's layout is in ``moekit/training/run.py``; the README's "Training" section has the CLI.
"""

from moekit.lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "moekit.training.config",
    "DataConfig": "moekit.data.dataset",
    "train": "moekit.training.loop",
    "resume_run": "moekit.training.loop",
    "train_step": "moekit.training.loop",
    "evaluate": "moekit.training.loop",
    "next_token_loss": "moekit.training.loop",
    "LossFn": "moekit.training.loop",
    "ParamFilter": "moekit.training.loop",
    "TrainResult": "moekit.training.loop",
    "EvalResult": "moekit.training.loop",
    "NonFiniteLossError": "moekit.training.loop",
    "CheckpointError": "moekit.training.checkpoint",
    "find_checkpoint": "moekit.training.checkpoint",
    "list_checkpoints": "moekit.training.checkpoint",
    "load_checkpoint": "moekit.training.checkpoint",
    "LayerRouting": "moekit.training.metrics",
    "read_metrics": "moekit.training.metrics",
    "plot_run": "moekit.training.plots",
    "LoadedRun": "moekit.training.run",
    "load_run": "moekit.training.run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
