"""The run folder: what a training run writes, and ``load_run`` to get a trained model back.

    RUN/
      config.json          the model's ModelConfig (vocab_size set to the tokenizer's);
                           ``moekit inspect RUN`` reads it
      train_config.json    the TrainConfig, with its DataConfig (sources, split, tokenizer)
      tokenizer.json       the tokenizer (``tokenizers`` JSON for BPE; a small record for bytes)
      metrics.jsonl        every metric, one JSON record per line (see training/metrics.py)
      loss.png             train/val loss; for MoE models balance per layer and final expert load
      events.out.tfevents.*  TensorBoard events, when tensorboard is installed
      checkpoints/step-NNNNNNNN/  model.safetensors, state.pt, meta.json (see checkpoint.py);
                           the last ``keep_last`` plus the best by validation loss

``load_run(RUN)`` returns the model (in eval mode), its configs and tokenizer;
``LoadedRun.validation_batches()`` gives the run's own held-out batches, and ``metrics()``
its log, for analyses that compare runs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.data.dataset import TokenData, check_length, prepare_data, validation_batches
from moekit.data.tokenizer import TextTokenizer, load_tokenizer
from moekit.errors import UsageError
from moekit.fileio import atomic_write_json
from moekit.model import MoETransformer
from moekit.training.checkpoint import find_checkpoint, load_checkpoint
from moekit.training.config import TrainConfig
from moekit.training.metrics import read_metrics

MODEL_CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
TOKENIZER_FILE = "tokenizer.json"


def write_run_files(run_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, tokenizer: TextTokenizer) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / MODEL_CONFIG_FILE, model_cfg.to_dict())
    atomic_write_json(run_dir / TRAIN_CONFIG_FILE, cfg.to_dict())
    tokenizer.save(run_dir / TOKENIZER_FILE)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path.parent} is not a moekit run folder: {path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def read_run_configs(run_dir: str | Path) -> tuple[TrainConfig, ModelConfig]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"no such run folder: {run_dir}")
    cfg = TrainConfig.from_dict(_read_json(run_dir / TRAIN_CONFIG_FILE))
    return cfg, ModelConfig.from_dict(_read_json(run_dir / MODEL_CONFIG_FILE))


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / TRAIN_CONFIG_FILE).exists()


@dataclass
class LoadedRun:
    """A trained model with everything needed to evaluate or analyze it."""

    run_dir: Path
    model: MoETransformer  # eval mode, on the device asked for
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: TextTokenizer
    checkpoint: Path
    step: int
    val_loss: float | None  # recorded when the checkpoint was written

    def data(self, sources: list[str] | None = None, cache_dir: str | None = None, log=print) -> TokenData:
        """The run's corpus (or ``sources``, all held out) tokenized with the run's tokenizer."""
        cfg = self.train_cfg.data
        if sources is not None:
            cfg = dataclasses.replace(cfg, sources=list(sources), val_fraction=1.0)
        return prepare_data(cfg, cache_dir or self.train_cfg.cache_dir, tokenizer=self.tokenizer, log=log)

    def validation_batches(self, batch_size: int | None = None, seq_len: int | None = None,
                           max_batches: int | None = None, sources: list[str] | None = None,
                           cache_dir: str | None = None, log=print) -> list[torch.Tensor]:
        """Held-out token batches [B, S+1] (inputs ``b[:, :-1]``, targets ``b[:, 1:]``), by default
        exactly the windows the run evaluated on."""
        t = self.train_cfg
        seq_len = seq_len or t.seq_len
        data = self.data(sources, cache_dir, log)
        check_length(data, seq_len, need_train=False)
        return validation_batches(data.val, batch_size or t.batch_size, seq_len, max_batches or t.eval_batches)

    def metrics(self, kind: str | None = None) -> list[dict]:
        return read_metrics(self.run_dir, kind)


def load_run(run_dir: str | Path, checkpoint: str | int = "last", device: str | torch.device = "cpu") -> LoadedRun:
    """Load a run folder's model from checkpoint ``last``, ``best`` or a step number.

    The checkpoint's files are verified against their checksums before anything is loaded;
    a corrupt one raises ``CheckpointError`` (a ``UsageError``) naming it.
    """
    run_dir = Path(run_dir)
    train_cfg, model_cfg = read_run_configs(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    path = find_checkpoint(run_dir, checkpoint)
    model = MoETransformer(model_cfg)
    _, meta = load_checkpoint(path, model, map_location="cpu")
    model.to(device).eval()
    return LoadedRun(run_dir, model, model_cfg, train_cfg, tokenizer, path, int(meta["step"]), meta.get("val_loss"))


__all__ = ["LoadedRun", "load_run", "read_run_configs", "write_run_files", "is_run_dir",
           "MODEL_CONFIG_FILE", "TRAIN_CONFIG_FILE", "TOKENIZER_FILE"]
