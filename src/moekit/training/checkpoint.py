"""Checkpoints: written atomically, verified before loading, pruned to the last N plus the best.

A checkpoint is a folder ``RUN/checkpoints/step-NNNNNNNN/`` holding

    model.safetensors   the model's state_dict (parameters and persistent buffers, e.g. the
                        routers' balancing bias ``expert_bias``)
    state.pt            optimizer state, step, training time spent, RNG states, best val loss
    meta.json           step, validation loss, and the size and sha256 of each file above

It is written into ``.tmp-step-NNNNNNNN-*`` (each file fsynced, meta.json last) and renamed
into place, so a crash leaves the previous checkpoints intact and never a folder that looks
complete. Loading checks every size and checksum first: a truncated or modified file raises
``CheckpointError`` naming it, and nothing is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from moekit.errors import UsageError
from moekit.fileio import atomic_write_json, fsync_dir, fsync_file, make_temp_dir

FORMAT_VERSION = 1
CHECKPOINT_FILES = ("model.safetensors", "state.pt")
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(UsageError):
    """A checkpoint that is missing, truncated or corrupt."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    val_loss: float | None


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(run_dir: str | Path, model: nn.Module, state: dict, val_loss: float | None = None) -> Path:
    """Write checkpoint ``state["step"]`` of ``model`` (+ optimizer etc. in ``state``) -> its folder."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    final = root / f"step-{step:08d}"
    tmp = make_temp_dir(root, f".tmp-{final.name}-")
    try:
        save_model(model, str(tmp / "model.safetensors"), force_contiguous=True)
        torch.save(state, tmp / "state.pt")
        files = {}
        for name in CHECKPOINT_FILES:
            fsync_file(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        meta = dict(format=FORMAT_VERSION, step=step, val_loss=val_loss, files=files, time=time.time())
        atomic_write_json(tmp / "meta.json", meta)
        fsync_dir(tmp)
        if final.exists():  # the same step again (a resumed run re-saving): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def verify_checkpoint(path: str | Path) -> dict:
    """The checkpoint's meta.json after checking every file's size and sha256; else CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        meta = json.loads((path / "meta.json").read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: unreadable meta.json") from None
    for name in CHECKPOINT_FILES:
        f, want = path / name, files.get(name, {})
        if not f.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {name} has {size} bytes, "
                                  f"expected {want.get('bytes')}")
        if _sha256(f) != want.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its sha256")
    return meta


def load_checkpoint(path: str | Path, model: nn.Module, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Verify, then load the weights into ``model`` -> (training state from state.pt, meta.json)."""
    path = Path(path)
    meta = verify_checkpoint(path)
    try:
        state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"checkpoint {path}: cannot read state.pt ({e})") from None
    try:
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(map_location))
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model: {first}") from None
    return state, meta


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoint folders (by name and meta.json; not verified), oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    for d in sorted(root.glob("step-*")) if root.is_dir() else []:
        m = _STEP_DIR.match(d.name)
        if not m:
            continue
        try:
            val = json.loads((d / "meta.json").read_text()).get("val_loss")
        except (OSError, ValueError):
            val = None  # corrupt: still listed, so that choosing it reports the corruption
        found.append(CheckpointInfo(d, int(m.group(1)), val))
    return found


def best_checkpoint(infos: list[CheckpointInfo]) -> CheckpointInfo | None:
    scored = [c for c in infos if c.val_loss is not None]
    return min(scored, key=lambda c: (c.val_loss, -c.step)) if scored else None


def find_checkpoint(run_dir: str | Path, which: str | int = "last") -> Path:
    """``last``, ``best`` (lowest validation loss) or a step number -> a checkpoint folder.

    The choice is by name; the caller verifies (load_checkpoint does). A corrupt newest
    checkpoint is therefore reported, not skipped silently in favour of an older one.
    """
    infos = list_checkpoints(run_dir)
    if not infos:
        raise CheckpointError(f"no checkpoints in {checkpoint_root(run_dir)}")
    if which == "last":
        return infos[-1].path
    if which == "best":
        best = best_checkpoint(infos)
        return (best or infos[-1]).path
    try:
        step = int(which)
    except ValueError:
        raise UsageError(f"checkpoint must be last, best or a step number, got {which!r}") from None
    for c in infos:
        if c.step == step:
            return c.path
    raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_root(run_dir)} "
                          f"(have: {', '.join(str(c.step) for c in infos)})")


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete step checkpoints beyond the newest ``keep_last``, always keeping the best."""
    infos = list_checkpoints(run_dir)
    best = best_checkpoint(infos)
    keep = {c.path for c in infos[-keep_last:]} | ({best.path} if best else set())
    for c in infos:
        if c.path not in keep:
            shutil.rmtree(c.path, ignore_errors=True)


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "find_checkpoint",
    "best_checkpoint",
    "prune_checkpoints",
    "checkpoint_root",
]
