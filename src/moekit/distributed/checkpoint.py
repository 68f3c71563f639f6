"""Checkpoints of a parallelized model: consolidated on save, resharded on load.

Every rank takes part in gathering the full tensors (expert slices all-gathered over the
``ep`` group, FSDP shards with ``full_tensor``); rank 0 then writes the ordinary checkpoint
folder (``training/checkpoint.py``: model.safetensors + state.pt, verified, atomic), the same
files a single process writes. So a run resumes at any world size, 1 included: the weights
are loaded into the unsharded model before ``parallelize``, and the optimizer's moments are
cut to this rank's pieces after it (``load_optimizer_state``). The cost is a gather per
checkpoint, memory for one full copy on rank 0: right for models that train on one node.

Optimizer state is keyed as ``torch.optim`` keys it, by parameter index; ``parallelize``
replaces parameters in place under the same names, so the indices are those of the
single-process model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moekit.distributed.mesh import DistContext
from moekit.distributed.parallelize import expert_parameters
from moekit.meta import on_meta


def _full(t: torch.Tensor, is_expert: bool, ctx: DistContext) -> torch.Tensor:
    """The whole tensor from this rank's piece (collective: every rank calls it, in order)."""
    if isinstance(t, DTensor):
        t = t.full_tensor().clone()  # its own storage: it may be a view of FSDP's gather buffer
    if is_expert:
        parts = [torch.empty_like(t) for _ in range(ctx.ep)]
        dist.all_gather(parts, t.contiguous(), group=ctx.group("ep"))
        t = torch.cat(parts)  # ep ranks hold consecutive expert slices
    return t.detach()


def _piece(full: torch.Tensor, like: torch.Tensor, is_expert: bool, ctx: DistContext) -> torch.Tensor:
    """This rank's piece of ``full``, shaped and placed as ``like`` (a parameter or its state)."""
    if is_expert:
        L = full.shape[0] // ctx.ep
        full = full[ctx.ep_rank * L:(ctx.ep_rank + 1) * L]
    full = full.to(like.device, like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements)
    return full.clone()


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The single-process ``state_dict`` of a parallelized model, on every rank."""
    experts = {id(p) for p in expert_parameters(model)}
    expert_names = {name for name, p in model.named_parameters() if id(p) in experts}
    return {name: _full(t, name in expert_names, ctx) for name, t in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict:
    """``optimizer.state_dict()`` as the single-process run would have it, on every rank."""
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    experts = {id(p) for p in expert_parameters(model)}
    state = {}
    for idx, p in enumerate(params):
        if idx not in sd["state"]:
            continue
        state[idx] = {k: _full(v, id(p) in experts, ctx) if _is_per_element(v, p) else v
                      for k, v in sd["state"][idx].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict, ctx: DistContext) -> None:
    """Load a single-process optimizer state into the optimizer of a parallelized model."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    experts = {id(p) for p in expert_parameters(model)}
    state = {}
    for idx, s in full["state"].items():
        p = params[int(idx)]
        state[idx] = {k: _piece(v, p, id(p) in experts, ctx) if _is_full_per_element(v, p, id(p) in experts, ctx)
                      else v for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def _is_per_element(v, p: torch.Tensor) -> bool:
    """A moment (exp_avg, ...) with the parameter's shape, not a scalar like ``step``."""
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape


def _is_full_per_element(v, p: torch.Tensor, is_expert: bool, ctx: DistContext) -> bool:
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return False
    shape = list(p.shape)
    if is_expert:
        shape[0] *= ctx.ep
    return list(v.shape) == shape


def unsharded_twin(model: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    """A single-device model of the same config holding ``full`` (built on the meta device, so
    nothing is initialized twice): what ``save_checkpoint`` and ``save_pretrained`` take."""
    with on_meta():
        twin = _base_class(model)(model.cfg)
    twin.load_state_dict(full, assign=True)
    if model.cfg.tie_embeddings:
        twin.lm_head.weight = twin.embed.weight
    return twin


def _base_class(model: nn.Module) -> type:
    """DDP and FSDP2 put a subclass of their own in front of the model's class: the model's
    class is the first moekit one in the method resolution order."""
    return next(c for c in type(model).__mro__ if c.__module__.startswith("moekit."))


__all__ = ["full_state_dict", "full_optimizer_state", "load_optimizer_state", "unsharded_twin"]
