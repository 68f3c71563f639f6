"""Run a model over held-out text and record what every router decided.

Shape legend: T tokens (all windows, flattened in order), E experts, K experts per token,
D model dim, S sequence length, C categories.

1. ``eval_text``: held-out documents -> one token stream with a category per token.
2. ``windows``: the stream cut into non-overlapping [S+1] windows, batched.
3. ``capture_routing``: forward every batch with a hook on each MoE layer's router, keeping
   the chosen experts as a [T, E] mask, the top-1 expert, the router entropy, the router's
   input (for the stability test) and the dropped fraction at the trained capacity.

Routing is read from the router's output (``RouterOutput``) and ``MoELayer.last_stats``
only, never from dispatch internals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from moekit.analysis.categories import CategoryScheme, encode_with_offsets, token_categories
from moekit.data.dataset import DataConfig, validation_names
from moekit.data.sources import Corpus, Document
from moekit.routing_metrics import router_entropy


@dataclass
class EvalText:
    tokens: np.ndarray  # [N] int64, documents each followed by end-of-text
    categories: np.ndarray  # [N] int8 indices into names
    names: tuple[str, ...]
    documents: list[str]  # names of the documents used


def held_out_documents(cfg: DataConfig) -> Iterator[Document]:
    """The documents a run held out for validation, chosen by the data pipeline's own rule
    (``validation_names``): one pass for the names, one for the chosen documents."""
    corpus = Corpus(cfg.sources, cfg.text_field)
    val = validation_names((doc.name for doc in corpus.documents()), cfg)
    return (doc for doc in corpus.documents() if doc.name in val)


def eval_text(docs: Iterable[Document], tokenizer, scheme: CategoryScheme, max_tokens: int) -> EvalText:
    """Tokenize documents (with categories) until ``max_tokens`` tokens are collected."""
    ids_all, cats_all, names, n = [], [], [], 0
    for doc in docs:
        ids, offsets = encode_with_offsets(tokenizer, doc.text)
        labels = scheme.label(doc.text, doc.name)
        cats = token_categories(labels, offsets, len(scheme.names), scheme.other, scheme.whitespace)
        ids_all.append(np.asarray(ids + [tokenizer.eos_id], dtype=np.int64))
        cats_all.append(np.append(cats, np.int8(scheme.other)))
        names.append(doc.name)
        n += len(ids) + 1
        if n >= max_tokens + 1:
            break
    if not ids_all:
        return EvalText(np.zeros(0, np.int64), np.zeros(0, np.int8), scheme.names, [])
    tokens, cats = np.concatenate(ids_all)[: max_tokens + 1], np.concatenate(cats_all)[: max_tokens + 1]
    return EvalText(tokens, cats, scheme.names, names)


def windows(text: EvalText, seq_len: int, batch_size: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """Batches [B, S+1] of consecutive non-overlapping windows, and the [T] categories of
    their input positions (T = windows * S, in batch order)."""
    n = (len(text.tokens) - 1) // seq_len
    tok = np.stack([text.tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)]) if n else None
    if tok is None:
        return [], np.zeros(0, np.int8)
    cats = np.concatenate([text.categories[i * seq_len: (i + 1) * seq_len] for i in range(n)])
    batches = [torch.from_numpy(tok[i: i + batch_size]) for i in range(0, n, batch_size)]
    return batches, cats


@dataclass
class LayerCapture:
    """One MoE layer's routing over all T evaluation tokens."""

    layer: int  # block index
    num_experts: int
    mask: torch.Tensor  # [T, E] bool: the experts each token was sent to (before capacity)
    top1: torch.Tensor  # [T] int64: the highest-ranked chosen expert
    entropy: torch.Tensor  # [T] fp32: entropy of the router's distribution, nats
    router_inputs: torch.Tensor  # [T_s, D] fp32: the router's inputs for the first T_s tokens
    dropped: float = 0.0  # fraction of routed slots dropped by capacity (token-weighted over batches)


def routing_mask(out, num_experts: int) -> torch.Tensor:
    """RouterOutput -> [T, E] bool of chosen (token, expert) pairs, token or expert choice."""
    T = out.probs.shape[0]
    if out.expert_choice:  # ids [E, C] are token ids
        mask_ET = torch.zeros(num_experts, T, dtype=torch.bool, device=out.ids.device)
        return mask_ET.scatter_(1, out.ids, True).t()
    return torch.zeros(T, num_experts, dtype=torch.bool, device=out.ids.device).scatter_(1, out.ids, True)


def top1_of(out) -> torch.Tensor:
    """The expert a token is sent to first: the top of its ranked choice (or, for expert
    choice, where no ranking per token exists, its highest-probability expert)."""
    return out.probs.argmax(-1) if out.expert_choice else out.ids[:, 0]


class _RouterRecorder:
    """Forward hooks on every router; collects per-batch pieces, then concatenates."""

    def __init__(self, model, stability_tokens: int):
        self.layers = model.moe_layers()
        self.ids = model.cfg.moe_layer_ids
        self.parts: list[list[tuple]] = [[] for _ in self.layers]
        self.kept_inputs = [0] * len(self.layers)
        self.stability_tokens = stability_tokens
        self.handles = [layer.router.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args, out):
            x_TD = args[0].detach().float()
            room = self.stability_tokens - self.kept_inputs[i]
            keep = x_TD[: max(room, 0)].cpu().clone()  # a copy: a view would keep the whole batch alive
            self.kept_inputs[i] += keep.shape[0]
            probs = out.probs.detach()
            entropy = router_entropy(probs)
            self.parts[i].append((routing_mask(out, module.cfg.num_experts).cpu(), top1_of(out).cpu(),
                                  entropy.cpu(), keep))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def capture_routing(model, batches: list[torch.Tensor], stability_tokens: int = 8192
                    ) -> tuple[list[LayerCapture], float]:
    """Forward ``batches`` ([B, S+1]; inputs ``b[:, :-1]``) in eval mode -> per-layer captures
    and the mean next-token cross-entropy over all targets."""
    model.eval()
    device = next(model.parameters()).device
    rec = _RouterRecorder(model, stability_tokens)
    nll, n, dropped = 0.0, 0, [[0.0, 0] for _ in rec.layers]
    try:
        for batch in batches:
            batch = batch.to(device)
            logits = model(batch[:, :-1]).logits
            nll += float(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            n += batch[:, 1:].numel()
            for i, s in enumerate(model.routing_stats()):
                if s is not None:
                    dropped[i][0] += s.dropped_fraction * s.num_tokens
                    dropped[i][1] += s.num_tokens
    finally:
        rec.remove()
    captures = []
    for i, layer in enumerate(rec.layers):
        masks, top1, ent, inputs = zip(*rec.parts[i]) if rec.parts[i] else ((), (), (), ())
        E = layer.cfg.num_experts
        captures.append(LayerCapture(
            layer=rec.ids[i], num_experts=E,
            mask=torch.cat(masks) if masks else torch.zeros(0, E, dtype=torch.bool),
            top1=torch.cat(top1) if top1 else torch.zeros(0, dtype=torch.int64),
            entropy=torch.cat(ent) if ent else torch.zeros(0),
            router_inputs=torch.cat(inputs) if inputs else torch.zeros(0, layer.cfg.d_model),
            dropped=dropped[i][0] / max(dropped[i][1], 1),
        ))
    return captures, (nll / n if n else math.nan)


__all__ = ["EvalText", "LayerCapture", "held_out_documents", "eval_text", "windows", "capture_routing",
           "routing_mask", "top1_of"]
