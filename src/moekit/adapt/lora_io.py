"""LoRA adapters on their own: a safetensors file of the adapter tensors and a small JSON.

    RUN/adapter/
      adapter.safetensors    every adapter tensor under its moekit parameter name
                             (blocks.0.attn.wq.lora_A [r, in], blocks.1.ffn.experts.w_in_lora_B [E, H, r])
      adapter_config.json    format, rank, alpha, targets, dropout, the adapted matrix names,
                             the step and the model it was trained from (``init``)

The folder is written whole or not at all (a temporary folder, fsynced, then renamed).
``load_adapter`` applies the same targets to a model of the same architecture and loads the
tensors, every name and shape checked first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.adapt.lora import LoRAConfig, apply_lora, lora_state_dict
from moekit.errors import UsageError
from moekit.fileio import atomic_write_json, fsync_dir, fsync_file, make_temp_dir, read_json_object

ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "moekit-lora/1"


def save_adapter(model: nn.Module, folder: str | Path, cfg: LoRAConfig, *, step: int | None = None,
                 init: str | None = None) -> Path:
    """Write the adapters of ``model`` (adapted with ``cfg``) to ``folder``, replacing it whole."""
    folder = Path(folder)
    tensors = {n: t.contiguous().cpu() for n, t in lora_state_dict(model).items()}
    if not tensors:
        raise UsageError("the model has no LoRA adapter to save")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(folder.parent, f".tmp-{folder.name}-")
    try:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": FORMAT})
        fsync_file(tmp / ADAPTER_FILE)
        atomic_write_json(tmp / ADAPTER_CONFIG, dict(
            format=FORMAT, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, dropout=cfg.dropout,
            matrices=adapted_matrices(tensors), step=step, init=init))
        fsync_dir(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def adapted_matrices(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The base matrix names the adapter tensors belong to (``...wq.lora_A`` -> ``...wq.weight``)."""
    out = []
    for n in tensors:
        owner, _, leaf = n.rpartition(".")
        base = f"{owner}.weight" if leaf in ("lora_A", "lora_B") else f"{owner}.{leaf.split('_lora_')[0]}"
        out.append(base)
    return sorted(set(out))


def read_adapter_config(folder: str | Path) -> tuple[LoRAConfig, dict]:
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_FILE).is_file():
        raise UsageError(f"{folder} is not a moekit LoRA adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_FILE})")
    meta = read_json_object(folder / ADAPTER_CONFIG)
    if meta.get("format") != FORMAT:
        raise UsageError(f"{folder / ADAPTER_CONFIG}: format {meta.get('format')!r} is not {FORMAT}")
    try:
        cfg = LoRAConfig(rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"], dropout=meta["dropout"])
    except (KeyError, ValueError) as e:
        raise UsageError(f"{folder / ADAPTER_CONFIG} is not a valid adapter config ({e})") from None
    return cfg, meta


def load_adapter(model: nn.Module, folder: str | Path) -> LoRAConfig:
    """Apply the adapter in ``folder`` to ``model`` (a plain model of the architecture it was
    trained on) and load its tensors -> its config. UsageError naming the first mismatch."""
    folder = Path(folder)
    cfg, _ = read_adapter_config(folder)
    try:
        tensors = load_file(str(folder / ADAPTER_FILE))
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{folder / ADAPTER_FILE} cannot be read ({e})") from None
    apply_lora(model, cfg)
    want = lora_state_dict(model)
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise UsageError(f"adapter {folder} does not fit this model: "
                         + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
                         + f" ({len(missing)} missing, {len(extra)} unexpected)")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(want[name].shape):
            raise UsageError(f"adapter {folder}: {name} has shape {tuple(t.shape)}, the model needs "
                             f"{tuple(want[name].shape)}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))
    return cfg


__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "adapted_matrices",
           "ADAPTER_DIR", "ADAPTER_FILE", "ADAPTER_CONFIG", "FORMAT"]
