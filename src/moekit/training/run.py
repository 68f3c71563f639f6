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

A new run goes only into a missing or empty folder, or a moekit run folder without a
checkpoint (a run that died early: its records are moved to ``RUN/previous-TIME/``, so a
fresh run starts fresh records); anything else is refused before a byte is written. While a
run trains it holds a lock on its folder (``flock``), so a second ``train`` into it is
refused and the leftovers of a killed checkpoint write can be removed safely.

``load_run(RUN)`` returns the model (in eval mode), its configs and tokenizer;
``LoadedRun.validation_batches()`` gives the run's own held-out batches, and ``metrics()``
its log, for analyses that compare runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.data.dataset import TokenData, check_length, default_cache_dir, prepare_data, validation_batches
from moekit.data.tokenizer import TextTokenizer, load_tokenizer
from moekit.errors import UsageError
from moekit.fileio import atomic_write_json
from moekit.model import MoETransformer
from moekit.training.checkpoint import list_checkpoints, load_from_run, remove_stale_temps
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


# What a run writes besides its configs and checkpoints: an earlier run's, when a new run starts
# in its folder, would mix with the new one (two step-0 evaluations, two TensorBoard streams).
RECORD_PATTERNS = ("metrics.jsonl", "events.out.tfevents.*", "loss.png")


def check_new_run_dir(run_dir: str | Path) -> None:
    """Refuse, before anything is written, a folder a new run must not write into."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder: choose a new folder")
    if is_run_dir(run_dir):
        if list_checkpoints(run_dir):
            raise UsageError(f"{run_dir} already holds a run: resume it with --resume {run_dir}, "
                             "or choose another --out (or --overwrite)")
        return  # a run that died before its first checkpoint: start_records moves its records aside
    entries = sorted(p.name for p in run_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(f"--out {run_dir} is not empty and not a moekit run folder (it holds {shown}): "
                         "choose a new or empty folder")


def trusted_cache_dir(run_dir: str | Path, cache_dir: str | None, log=print) -> str | None:
    """The ``cache_dir`` a run folder's train_config.json names, if it lies inside the run folder
    or the user's cache root (``default_cache_dir``); else None (the default cache) and a note.

    A run folder may come from someone else: its config must not make ``eval``, ``sample``,
    ``analyze`` or ``--resume`` write a data cache anywhere it likes.
    """
    if cache_dir is None:
        return None
    path = Path(cache_dir).expanduser().resolve()
    for root in (Path(run_dir).resolve(), default_cache_dir().expanduser().resolve()):
        if path == root or root in path.parents:
            return cache_dir
    log(f"note: {Path(run_dir) / TRAIN_CONFIG_FILE} names cache_dir {cache_dir}, outside the run folder and "
        f"the cache root {default_cache_dir()}: using the cache root (set MOEKIT_CACHE or --cache-dir to choose)")
    return None


class RunLock:
    """An exclusive ``flock`` on the run folder while a run trains in it (released on close).
    Where ``fcntl`` does not exist (Windows) or the file system has no locks there is no lock,
    and stale temporary checkpoints are left alone."""

    def __init__(self, run_dir: Path):
        self.fd: int | None = None
        try:
            import fcntl
        except ImportError:
            return
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another moekit process is training in {run_dir}: wait for it or stop it") from None
        except OSError:  # a file system without locks (some network mounts): run unlocked
            os.close(fd)
            return
        self.fd = fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def claim_run_dir(run_dir: str | Path, resume: bool, log=print) -> RunLock:
    """Create and lock the run folder; remove killed checkpoint writes' temporary folders; on a
    fresh run, move an earlier (checkpoint-less) run's records aside. -> the held lock.

    A fresh run calls ``check_new_run_dir`` first, before reading data: a data cache asked for
    inside the run folder (``--cache-dir RUN/cache``) may exist by the time of this call."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        if lock.held:
            for p in remove_stale_temps(run_dir):
                log(f"removed {p}, left by a checkpoint write that was killed")
        if not resume:
            _move_old_records(run_dir, log)
    except BaseException:
        lock.close()
        raise
    return lock


def _move_old_records(run_dir: Path, log) -> None:
    old = [p for pattern in RECORD_PATTERNS for p in sorted(run_dir.glob(pattern))]
    if not old:
        return
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    aside = run_dir / f"previous-{stamp}"
    while aside.exists():  # two early deaths within a second
        n += 1
        aside = run_dir / f"previous-{stamp}-{n}"
    aside.mkdir()
    for p in old:
        p.rename(aside / p.name)
    log(f"note: {run_dir} held the records of an earlier run that stopped before its first checkpoint; "
        f"moved {', '.join(p.name for p in old)} to {aside}")


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
        cache_dir = cache_dir or trusted_cache_dir(self.run_dir, self.train_cfg.cache_dir, log)
        return prepare_data(cfg, cache_dir, tokenizer=self.tokenizer, log=log)

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


def load_run(run_dir: str | Path, checkpoint: str | int = "last", device: str | torch.device = "cpu", *,
             check_memory: bool = True, check_finite: bool = True, merge_lora: bool = True) -> LoadedRun:
    """Load a run folder's model from checkpoint ``last``, ``best`` or a step number.

    The model must fit in the memory available (``check_memory``; see ``moekit.memory``). The
    checkpoint's files are verified against their checksums, its tensors' names and shapes
    against the model's and (``check_finite``) their values for NaN/inf, before anything is
    loaded; a bad one raises ``CheckpointError`` (a ``UsageError``) naming it. A LoRA run's
    adapters are folded into the weights (``merge_lora``): a plain model, which every consumer
    (eval, generate, quantize, export, a further fine-tune) takes as is; ``merge_lora=False``
    keeps the LoRA modules.
    """
    from moekit.memory import check_fits

    run_dir = Path(run_dir)
    train_cfg, model_cfg = read_run_configs(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    check_fits(model_cfg, "cpu", force=not check_memory, what=f"the model of {run_dir}")
    if str(device) != "cpu":
        check_fits(model_cfg, str(device), force=not check_memory, what=f"the model of {run_dir}")
    model = MoETransformer(model_cfg)
    if train_cfg.trainable == "lora":  # its checkpoints hold the adapters beside the frozen weights
        from moekit.adapt.lora import apply_lora

        apply_lora(model, train_cfg.lora_config())
    path, _, meta = load_from_run(run_dir, checkpoint, model, map_location="cpu", check_finite=check_finite)
    if train_cfg.trainable == "lora" and merge_lora:
        from moekit.adapt.lora import merge_lora as merge

        merge(model)
    model.to(device).eval()
    return LoadedRun(run_dir, model, model_cfg, train_cfg, tokenizer, path, int(meta["step"]), meta.get("val_loss"))


__all__ = ["LoadedRun", "load_run", "read_run_configs", "write_run_files", "is_run_dir", "check_new_run_dir",
           "claim_run_dir", "RunLock", "RECORD_PATTERNS", "trusted_cache_dir",
           "MODEL_CONFIG_FILE", "TRAIN_CONFIG_FILE", "TOKENIZER_FILE"]
