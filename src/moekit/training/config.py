"""The training config, and how a run's configs are overridden from files and ``--set``.

A run has two configs: the model's (``ModelConfig``, saved as ``config.json``) and this
``TrainConfig`` (saved as ``train_config.json``), which nests the ``DataConfig``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.config import ModelConfig, check_choice, check_fields, check_float, check_int
from moekit.data.dataset import DataConfig
from moekit.errors import ConfigError, UsageError

PRECISIONS = ("fp32", "bf16")
# What may change when a run is resumed: bounds and bookkeeping, nothing that changes the math
# of the steps already planned (max_steps does move the cosine horizon: the user's call).
RESUMABLE_FIELDS = ("max_steps", "time_budget", "eval_every", "eval_batches", "ckpt_every", "keep_last",
                    "log_every", "device", "cache_dir")
# What may change on resume when asked explicitly (--change-optimizer): the remedy for a run that
# diverged is to lower the learning rate and go on from a good checkpoint.
OPTIMIZER_FIELDS = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")


@dataclass
class TrainConfig:
    """One training run. Defaults suit the tiny presets on a few CPU cores."""

    data: DataConfig = field(default_factory=DataConfig)
    seq_len: int = 128  # tokens per training sequence (at most the model's max_seq_len)
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps; also the horizon of the cosine decay
    time_budget: float | None = None  # minutes of training (evaluations included); also a decay horizon
    lr: float = 2e-3  # peak learning rate (small models tolerate a high one)
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio (Chinchilla, LLaMA: 10%)
    warmup_steps: int = 20  # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.1  # AdamW, on matrices only (not norms, biases, the balancing bias)
    beta1: float = 0.9
    beta2: float = 0.95  # GPT-3 / LLaMA: steadier than 0.999 at high learning rates
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    # The routers' learning rate relative to everything else's (their own optimizer groups).
    # Fixed for a run: a resume cannot change the optimizer's group layout.
    router_lr_mult: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast; the router computes in fp32 regardless)
    seed: int = 0  # initialization, batches and router noise: the same seed gives the same run
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    eval_every: int = 50  # validation loss, perplexity and routing statistics every N steps
    eval_batches: int = 8  # validation batches per evaluation (the same windows every time)
    ckpt_every: int = 100  # checkpoint every N steps; also at the end and on Ctrl-C
    keep_last: int = 2  # step checkpoints kept, besides the best by validation loss
    log_every: int = 10  # a printed line every N steps when the output is not a terminal
    cache_dir: str | None = None  # tokenized data cache; None = $MOEKIT_CACHE or ~/.cache/moekit
    # Fine-tuning (training/freeze.py): the module kinds that train (a preset: all | non-moe |
    # attention | experts | router | shared), then parameter-name patterns to freeze as well.
    # Kept here so that a resumed fine-tune freezes exactly what it froze before.
    trainable: str = "all"
    freeze: list[str] = field(default_factory=list)
    # LoRA (trainable = "lora"; adapt/lora.py): rank, scale alpha / rank, the targets (module
    # kinds attention | dense | shared | experts, all, or name patterns) and dropout on their input.
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["all"])
    lora_dropout: float = 0.0
    # Dropout on the routed experts' hidden activations, in training only (Switch Transformer,
    # sec. 2.3: 0.4 when fine-tuning, 0 in pre-training); 0 = off.
    expert_dropout: float = 0.0
    init: str | None = None  # the model folder a fine-tune started from (a record; --init)
    loss: str = "lm"  # lm (next-token) | distill (moekit distill: needs its teacher, so no plain --resume)
    # Index of the first training micro-batch. A run that continues another model's training
    # (an experiment's later stage) reads the batches that follow the ones it has seen, so the
    # two stages see the same token stream as one run of their total length.
    first_batch: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.data, DataConfig):
            self.data = DataConfig.from_dict(self.data)
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                     "ckpt_every", "keep_last", "log_every"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_int("first_batch", self.first_batch, minimum=0)
        if self.time_budget is not None:
            check_float("time_budget", self.time_budget, 0.0, strict=True)
        check_float("lr", self.lr, 0.0, strict=True)
        check_float("router_lr_mult", self.router_lr_mult, 0.0, strict=True)
        check_float("min_lr_ratio", self.min_lr_ratio)
        if self.min_lr_ratio > 1:
            raise ConfigError(f"min_lr_ratio must be <= 1, got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip"):
            check_float(name, getattr(self, name))
        for name in ("beta1", "beta2"):
            check_float(name, getattr(self, name))
            if getattr(self, name) >= 1:
                raise ConfigError(f"{name} must be < 1, got {getattr(self, name)}")
        check_choice("precision", self.precision, PRECISIONS)
        from moekit.training.freeze import PRESETS

        check_choice("trainable", self.trainable, tuple(PRESETS))
        if not isinstance(self.freeze, (list, tuple)) or not all(isinstance(f, str) and f for f in self.freeze):
            raise ConfigError(f"freeze must be a list of parameter-name patterns, got {self.freeze!r}")
        self.freeze = list(self.freeze)
        self.lora_targets = list(self.lora_targets) if isinstance(self.lora_targets, (list, tuple)) else self.lora_targets
        self.lora_config()  # validates the lora_* fields
        check_float("expert_dropout", self.expert_dropout)
        if self.expert_dropout >= 1:
            raise ConfigError(f"expert_dropout must be < 1, got {self.expert_dropout}")
        check_choice("loss", self.loss, ("lm", "distill"))
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def lora_config(self):
        """The ``adapt.lora.LoRAConfig`` of the lora_* fields."""
        from moekit.adapt.lora import LoRAConfig

        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets,
                          dropout=self.lora_dropout)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**check_fields(cls, data, "train"))



def parse_value(text: str) -> Any:
    """A --set value: JSON when it parses (1e-3, true, null, [0, 1]), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"none": None, "None": None}.get(text, text)


def apply_override(train: dict, model: dict, assignment: str) -> None:
    """Apply one ``KEY=VALUE`` to the config dicts in place.

    KEY is dotted: ``model.moe.top_k`` or ``train.lr``; without the prefix, a TrainConfig
    field (``lr``, ``data.vocab_size``) wins, then a ModelConfig one (``moe.top_k``).
    """
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UsageError(f"--set expects KEY=VALUE, got {assignment!r}")
    path = key.strip().split(".")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if path[0] in ("train", "model") and len(path) > 1:
        target, path = (train if path[0] == "train" else model), path[1:]
    elif path[0] in train_fields:
        target = train
    elif path[0] in model_fields:
        target = model
    else:
        raise UsageError(f"--set {key}: no such training or model field")
    _set_path(target, path, parse_value(raw), key)


def _set_path(d: dict, path: list[str], value: Any, key: str) -> None:
    for part in path[:-1]:
        if not isinstance(d.get(part), dict):
            raise UsageError(f"--set {key}: {part!r} is not a section here (is it set to null?)")
        d = d[part]
    d[path[-1]] = value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON run file: TrainConfig fields, plus ``preset`` and ``model``
    (a mapping of ModelConfig fields laid over the preset)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError(f"reading {path} needs pyyaml (pip install pyyaml), or give a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of config fields")
    return data


def merge(base: dict, over: dict) -> dict:
    """``over`` laid onto ``base``, recursively for nested mappings."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


__all__ = ["TrainConfig", "PRECISIONS", "RESUMABLE_FIELDS", "OPTIMIZER_FIELDS", "apply_override", "parse_value", "load_config_file", "merge"]
