"""Routing health during fine-tuning: does the router drift away from where it started?

Small-data fine-tuning can collapse routing (ST-MoE, Zoph et al. 2022, sec. 4.4). The eval
records already hold each layer's max_violation and dead experts; ``RouterDrift`` adds the
top-1 agreement with the starting router: the share of validation tokens whose first choice
is still the expert the router at step 0 would have chosen for the same router input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RouterDrift:
    """An ``on_eval`` hook for ``train``: snapshots every MoE layer's router now, and at each
    evaluation returns ``{"top1_agreement": [one share per MoE layer]}`` over ``max_batches``
    validation batches."""

    def __init__(self, model: nn.Module, max_batches: int = 2):
        self.max_batches = max_batches
        self.start = [(layer.router.weight.detach().float().clone(), _bias(layer.router), layer.cfg.router)
                      for layer in model.moe_layers()]

    @torch.no_grad()
    def __call__(self, model: nn.Module, batches: list[torch.Tensor]) -> dict:
        layers = model.moe_layers()
        if not layers or any(layer.cfg.router == "expert_choice" for layer in layers):
            return {}
        seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
        hooks = [layer.router.register_forward_hook(_recorder(seen[i])) for i, layer in enumerate(layers)]
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            for batch in batches[: self.max_batches]:
                model(batch[:, :-1].to(device))
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        return {"top1_agreement": [self._agreement(pairs, *start) for pairs, start in zip(seen, self.start)]}

    @staticmethod
    def _agreement(pairs, w0_ED: torch.Tensor, b0_E: torch.Tensor | None, kind: str) -> float:
        """The starting router's first choice, as ``Router._token_choice`` makes it (without
        group limits), against the current one."""
        same = total = 0
        for x_TD, now_T in pairs:
            logits = F.linear(x_TD.float(), w0_ED.to(x_TD.device))  # [T, E]
            scores = {"sigmoid": torch.sigmoid, "sqrtsoftplus": lambda t: F.softplus(t).sqrt()}.get(
                kind, lambda t: torch.softmax(t, -1))(logits)
            if b0_E is not None:  # a selection bias steers the choice
                scores = scores + b0_E.to(x_TD.device)
            same += int((scores.argmax(-1) == now_T).sum())
            total += now_T.numel()
        return same / max(total, 1)


def _bias(router: nn.Module) -> torch.Tensor | None:
    bias = getattr(router, "expert_bias", None)
    return None if bias is None else bias.detach().float().clone()


def _recorder(store: list):
    def hook(module, inputs, out):
        store.append((inputs[0].detach(), out.ids[:, 0]))  # router input [T, D], first choice [T]
    return hook


__all__ = ["RouterDrift"]
