"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own
pieces, nothing is gathered, and a checkpoint written at one world size loads at any other,
1 process included, whatever the ``--ep`` / ``--dp`` / ``--fsdp`` on either side.

The trick is a set of keys that does not depend on the layout:

    model.NAME        every tensor of the single-process state_dict except routed experts:
                      an FSDP shard is saved as the DTensor it is (DCP records its global
                      shape and this rank's offset), a replicated tensor once (DCP keeps one
                      copy of a key that several ranks save)
    model.NAME.e      row e of a routed-expert weight (w_in [E, H, D] -> [H, D]), e over all
                      E experts: whichever rank holds expert e writes it (its ``ep`` slice,
                      or its FSDP shard of that slice)
    optim.NAME.KEY    AdamW's state of the same tensors (``step``, ``exp_avg``, ...), the
    optim.NAME.KEY.e  moments split exactly as their parameter

Loading builds the same keys for this rank's pieces (views into its parameters and a fresh
optimizer state) and DCP reads each piece's overlap from whichever files hold it: that is
the resharding. The folder is the usual checkpoint folder (``training/checkpoint.py``):
written into a temporary folder that rank 0 names, checksummed and renamed by rank 0 once
every rank has written; its ``state.pt`` (rank 0) holds the step, counters, RNG state and
the optimizer's hyperparameters. Every rank must see the same file system (as DCP assumes).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from moekit.training.checkpoint import (
    SHARDED_DIR, CheckpointContentError, check_shapes, checkpoint_root, new_checkpoint_temp, seal_checkpoint,
)


def _expert_rows(model: nn.Module) -> dict[str, tuple[int, torch.Tensor, int]]:
    """Routed-expert weights by state_dict name -> (global index of this rank's first row,
    the rows this rank holds [n, ...] as a plain tensor, E)."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for layer in model.moe_layers():
        experts = layer.experts
        base = getattr(experts, "first_expert", 0)  # an expert-parallel slice starts there
        for p in (experts.w_in, experts.w_out):
            first, rows = _local_rows(p)
            out[names[id(p)]] = (base + first, rows, layer.cfg.num_experts)
    return out


def _local_rows(t: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(offset along dim 0, this rank's rows) of a tensor, FSDP-sharded or not."""
    if not isinstance(t, DTensor):
        return 0, t.detach()
    assert tuple(t.placements) == (Shard(0),), f"expert weights are sharded along experts only, not {t.placements}"
    # FSDP2 cuts dim 0 as torch.chunk does (the last ranks may get fewer rows, or none)
    sizes = [len(c) for c in torch.arange(t.shape[0]).chunk(t.device_mesh.size())]
    coord = t.device_mesh.get_local_rank()
    return sum(sizes[:coord]), t.to_local().detach()


def _split(prefix: str, rows_info: tuple[int, torch.Tensor, int] | None, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """``t`` under its canonical key(s): one per expert row for a routed-expert tensor."""
    if rows_info is None:
        return {prefix: t.detach() if isinstance(t, nn.Parameter) else t}
    first, _, _ = rows_info
    _, rows = _local_rows(t)
    return {f"{prefix}.{first + i}": rows[i] for i in range(rows.shape[0])}


def canonical_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """This rank's pieces under layout-free keys (see the module docstring). Values share
    storage with the model and optimizer: loading into them loads the run."""
    experts = _expert_rows(model)
    sd = {}
    for name, t in model.state_dict().items():
        sd.update(_split(f"model.{name}", experts.get(name), t))
    if optimizer is not None:
        for name, p in model.named_parameters():
            for key, v in optimizer.state.get(p, {}).items():
                per_element = isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape
                sd.update(_split(f"optim.{name}.{key}", experts.get(name) if per_element else None, v))
    return sd


def save_sharded(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                 val_loss: float | None, layout: dict) -> Path:
    """Write checkpoint ``state["step"]``: every rank its pieces, rank 0 ``state`` (counters,
    RNG, optimizer hyperparameters) and the seal. Collective: every rank calls it."""
    root, step = checkpoint_root(run_dir), int(state["step"])
    main = dist.get_rank() == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
    name = [str(new_checkpoint_temp(root, step)) if main else None]
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    try:
        dcp.save(canonical_state(model, optimizer), storage_writer=dcp.FileSystemWriter(tmp / SHARDED_DIR))
        final = root / f"step-{step:08d}"
        if main:  # dcp.save returns once every rank's files and the metadata are written
            torch.save(state, tmp / "state.pt")
            files = ["state.pt", *sorted(str(f.relative_to(tmp)) for f in (tmp / SHARDED_DIR).iterdir())]
            final = seal_checkpoint(tmp, step, val_loss, files, layout="sharded", extra={"parallel": layout})
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The param groups without their parameters: what ``state.pt`` keeps of the optimizer."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 check_finite: bool = True) -> None:
    """Load a sharded checkpoint into ``model`` (any layout: single-process or parallelized)
    and, if given, ``optimizer``'s state. Collective when distributed. The weights are read
    into fresh tensors and checked (names, shapes, NaN/inf) before any is copied."""
    reader = dcp.FileSystemReader(Path(path) / SHARDED_DIR)
    meta = reader.read_metadata().state_dict_metadata
    _check_keys(path, model, meta)
    if optimizer is not None:
        _fresh_optimizer_state(model, optimizer, meta)
    target = canonical_state(model, optimizer)
    fresh = {k: torch.empty_like(v) if k.startswith("model.") else v for k, v in target.items()}
    no_dist = not dist.is_initialized()
    with warnings.catch_warnings():  # DCP warns that one process reads a checkpoint alone: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(fresh, storage_reader=reader, no_dist=no_dist)
    if check_finite:
        _check_finite(path, {k: v for k, v in fresh.items() if k.startswith("model.")}, no_dist)
    with torch.no_grad():
        for k, v in target.items():
            if k.startswith("model."):
                v.copy_(fresh[k])


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every model key of the whole checkpoint (all experts, not only this rank's) -> global shape."""
    experts = _expert_rows(model)
    want = {}
    for name, t in model.state_dict().items():
        if name in experts:
            _, rows, E = experts[name]
            want.update({f"model.{name}.{e}": tuple(rows.shape[1:]) for e in range(E)})
        else:
            want[f"model.{name}"] = tuple(t.shape)
    return want


def _check_keys(path: Path, model: nn.Module, meta: dict) -> None:
    want = {k[6:]: shape for k, shape in _expected_shapes(model).items()}  # without the "model." prefix
    have = {k[6:]: tuple(m.size) for k, m in meta.items() if k.startswith("model.") and hasattr(m, "size")}
    check_shapes(path, want, have)


def _fresh_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Empty state tensors, shaped as the checkpoint's, for DCP to load into: a moment is
    shaped as its parameter (this rank's piece of it), a scalar (``step``) as saved."""
    for name, p in model.named_parameters():
        prefix = f"optim.{name}."
        keys = {k[len(prefix):].split(".")[0] for k in meta if k.startswith(prefix)}
        if not keys:
            continue
        state = {}
        for key in sorted(keys):
            m = meta.get(prefix + key)
            if m is not None and len(m.size) == 0:  # a scalar: step
                state[key] = torch.zeros((), dtype=m.properties.dtype, device=p.device)
            else:
                state[key] = torch.zeros_like(p.detach())
        optimizer.state[p] = state


def _check_finite(path: Path, tensors: dict[str, torch.Tensor], no_dist: bool) -> None:
    bad = []
    for k, t in tensors.items():
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad.append(k[6:])
    if not no_dist:  # every rank raises alike, so none waits in a collective for the others
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, bad)
        bad = sorted({k for b in everyone for k in b})
    if bad:
        raise CheckpointContentError(f"checkpoint {path}: tensor {bad[0]!r} holds NaN/inf value(s)"
                                     + (f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else "")
                                     + " (--no-check-finite loads it anyway)")


__all__ = ["save_sharded", "load_sharded", "canonical_state", "optimizer_hyperparameters", "SHARDED_DIR"]
