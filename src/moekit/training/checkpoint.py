"""Checkpoints: written atomically, verified before loading, pruned to the last N plus the best.

A checkpoint is a folder ``RUN/checkpoints/step-NNNNNNNN/`` holding

    model.safetensors   the model's state_dict (parameters and persistent buffers, e.g. the
                        routers' balancing bias ``expert_bias``)
    state.pt            optimizer state, step, training time spent, RNG states, best val loss
    meta.json           step, validation loss, and the size and sha256 of each file above

A distributed run writes its checkpoints *sharded* instead (``distributed/sharded.py``):
``sharded/`` holds torch.distributed.checkpoint's files, each rank's pieces, in place of
model.safetensors, and state.pt no optimizer moments (they are in ``sharded/`` too);
meta.json says ``"layout": "sharded"`` and lists every file. ``load_checkpoint`` reads both
layouts, so everything that loads a run (eval, generate, export, resume at any world size)
takes either.

It is written into ``.tmp-step-NNNNNNNN-*`` (each file fsynced, meta.json last) and renamed
into place, so a crash leaves the previous checkpoints intact and never a folder that looks
complete. Loading checks every size and checksum first: a truncated or modified file raises
``CheckpointError`` naming it, and nothing is loaded. Then every tensor's name and shape is
compared with the model's, and (unless ``check_finite=False``) its values are checked for
NaN/inf, so a bad tensor is named before anything is copied. When the newest checkpoint is
corrupt, the error names the newest intact one, to resume from with ``--checkpoint N``.

A ``.tmp-step-*`` folder outlives its writer only when the process was killed mid-write;
``remove_stale_temps`` deletes them when a run starts or resumes (the run folder's lock,
``run.py``, says no other process is writing them).
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
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from moekit.errors import UsageError
from moekit.fileio import atomic_write_json, fsync_dir, fsync_file, make_temp_dir

FORMAT_VERSION = 1
CHECKPOINT_FILES = ("model.safetensors", "state.pt")
SHARDED_DIR = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint files
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TEMP_DIR = re.compile(r"^\.tmp-step-\d{8}-[A-Za-z0-9_]+$")  # make_temp_dir's names, nothing else


class CheckpointError(UsageError):
    """A checkpoint that is missing, truncated or corrupt."""


class CheckpointContentError(CheckpointError):
    """An intact checkpoint whose tensors do not fit the model or are not finite."""


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
    tmp = new_checkpoint_temp(root, step)
    try:
        save_model(model, str(tmp / "model.safetensors"), force_contiguous=True)
        torch.save(state, tmp / "state.pt")
        seal_checkpoint(tmp, step, val_loss, CHECKPOINT_FILES)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def new_checkpoint_temp(root: Path, step: int) -> Path:
    """The temporary folder a checkpoint of ``step`` is written into (``seal_checkpoint`` renames it)."""
    return make_temp_dir(root, f".tmp-step-{step:08d}-")


def seal_checkpoint(tmp: Path, step: int, val_loss: float | None, names: tuple[str, ...] | list[str],
                    layout: str = "consolidated", extra: dict | None = None) -> Path:
    """Fsync and checksum the files ``names`` (relative to ``tmp``), write meta.json last, and
    rename ``tmp`` to ``step-NNNNNNNN`` (replacing one of the same step) -> the final folder."""
    root, final = tmp.parent, tmp.parent / f"step-{step:08d}"
    files = {}
    for name in names:
        fsync_file(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    meta = dict(format=FORMAT_VERSION, step=step, val_loss=val_loss, files=files, time=time.time(), layout=layout,
                **(extra or {}))
    atomic_write_json(tmp / "meta.json", meta)
    for d in {(tmp / name).parent for name in names}:
        fsync_dir(d)
    fsync_dir(tmp)
    if final.exists():  # the same step again (a resumed run re-saving): replace it whole
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    return final


def is_sharded(meta: dict) -> bool:
    return meta.get("layout") == "sharded"


def required_files(meta: dict) -> tuple[str, ...]:
    """The files a checkpoint of this layout cannot be without (meta.json lists the rest)."""
    return ("state.pt", f"{SHARDED_DIR}/.metadata") if is_sharded(meta) else CHECKPOINT_FILES


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
    for name in dict.fromkeys([*required_files(meta), *files]):
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


def load_checkpoint(path: str | Path, model: nn.Module, map_location: str | torch.device = "cpu",
                    check_finite: bool = True) -> tuple[dict, dict]:
    """Verify, then load the weights into ``model`` -> (training state from state.pt, meta.json).

    Nothing is copied into ``model`` unless every file, name, shape (and, with
    ``check_finite``, every value) is sound; the error names the tensor.
    """
    path = Path(path)
    meta = verify_checkpoint(path)
    if is_sharded(meta):
        from moekit.distributed.sharded import load_sharded

        load_sharded(path, model, None, check_finite)
        return _read_state(path, map_location), meta
    check_tensors(path / "model.safetensors", model, check_finite)
    state = _read_state(path, map_location)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(map_location))
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model: {first}") from None
    return state, meta


def _read_state(path: Path, map_location) -> dict:
    try:
        return torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"checkpoint {path}: cannot read state.pt ({e})") from None


def check_shapes(where: Path, want: dict[str, tuple], have: dict[str, tuple], absent_ok=lambda name: False) -> None:
    """The checkpoint at ``where`` holds exactly the model's tensor names with its shapes
    (``absent_ok`` names may be missing): else CheckpointContentError naming the first difference."""
    missing = [n for n in sorted(set(want) - set(have)) if not absent_ok(n)]
    extra = sorted(set(have) - set(want))
    if missing or extra:
        what = f"lacks tensor {missing[0]!r}" if missing else f"has tensor {extra[0]!r} that this model lacks"
        more = len(missing) + len(extra) - 1
        raise CheckpointContentError(f"checkpoint {where} does not fit this model: it {what}"
                                     + (f" (and {more} more difference(s))" if more else ""))
    for name, shape in have.items():
        if shape != want[name]:
            raise CheckpointContentError(f"checkpoint {where} does not fit this model: tensor {name!r} has "
                                         f"shape {list(shape)} in the checkpoint but {list(want[name])} in the model")


def check_tensors(file: Path, model: nn.Module, check_finite: bool = True) -> None:
    """Every tensor of ``model`` is in ``file`` with its shape (and finite): else CheckpointError.

    Reads one tensor at a time (memory-mapped), so the check costs a read of the file, not a
    second copy of the model.
    """
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    with safe_open(str(file), framework="pt") as f:
        have = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        # a tied output matrix is saved once (safetensors' save_model drops the alias)
        check_shapes(file.parent, want, have, absent_ok=lambda n: _is_tied_alias(model, n, have))
        if check_finite:
            for name in have:
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise CheckpointContentError(f"checkpoint {file.parent}: tensor {name!r} holds {bad} NaN/inf "
                                          f"value(s) (--no-check-finite loads it anyway)")


def _is_tied_alias(model: nn.Module, name: str, have: dict) -> bool:
    sd = model.state_dict()
    return any(other in have and sd[other].data_ptr() == sd[name].data_ptr() for other in sd if other != name)


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


def newest_intact(run_dir: str | Path, below: int | None = None) -> CheckpointInfo | None:
    """The newest checkpoint (older than step ``below``) whose files pass their checksums."""
    for c in reversed(list_checkpoints(run_dir)):
        if below is not None and c.step >= below:
            continue
        try:
            verify_checkpoint(c.path)
        except CheckpointError:
            continue
        return c
    return None


def intact_hint(run_dir: str | Path, bad: Path) -> str:
    """For an error about checkpoint ``bad``: the newest older one that is intact, if any."""
    m = _STEP_DIR.match(Path(bad).name)
    good = newest_intact(run_dir, int(m.group(1)) if m else None)
    if good is None:
        return "no older checkpoint is intact"
    return f"the newest intact checkpoint is step {good.step}: use --checkpoint {good.step}"


def load_from_run(run_dir: str | Path, which: str | int, model: nn.Module, map_location: str | torch.device = "cpu",
                  check_finite: bool = True) -> tuple[Path, dict, dict]:
    """``find_checkpoint`` then ``load_checkpoint`` -> (its folder, state, meta); a corrupt
    checkpoint's error names the newest intact older one to fall back to."""
    path = find_checkpoint(run_dir, which)
    try:
        state, meta = load_checkpoint(path, model, map_location, check_finite)
    except CheckpointError as e:
        if isinstance(e, CheckpointContentError):
            raise
        raise CheckpointError(f"{e}; {intact_hint(run_dir, path)}") from None
    return path, state, meta


def discard_after(run_dir: str | Path, step: int) -> list[Path]:
    """Move checkpoints newer than ``step`` to ``RUN/discarded/`` (a run resumed from an older
    checkpoint trains those steps again; the old ones are kept, not deleted) -> their new paths."""
    later = [c for c in list_checkpoints(run_dir) if c.step > step]
    if not later:
        return []
    aside = Path(run_dir) / "discarded"
    aside.mkdir(exist_ok=True)
    moved = []
    for c in later:
        target = aside / f"{c.path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        c.path.rename(target)
        moved.append(target)
    fsync_dir(checkpoint_root(run_dir))
    return moved


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete the ``.tmp-step-*`` folders of checkpoint writes that were killed. The caller holds
    the run folder's lock, so no live writer owns one. -> the folders removed."""
    root = checkpoint_root(run_dir)
    stale = [p for p in root.iterdir() if p.is_dir() and _TEMP_DIR.match(p.name)] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


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
    "CheckpointContentError",
    "CheckpointInfo",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "find_checkpoint",
    "best_checkpoint",
    "prune_checkpoints",
    "checkpoint_root",
    "check_tensors",
    "newest_intact",
    "intact_hint",
    "remove_stale_temps",
    "load_from_run",
    "discard_after",
    "seal_checkpoint",
    "new_checkpoint_temp",
    "is_sharded",
    "SHARDED_DIR",
]
