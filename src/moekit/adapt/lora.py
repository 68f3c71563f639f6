"""LoRA (Hu et al. 2021) on a built ``MoETransformer``, applied from outside at its seams: the
attention projections and FFN matrices are swapped for twins that add a trainable low-rank
term, as gpt-fast swaps in quantized modules; the routed experts get a per-expert pair
(``lora_experts.py``). ``merge_lora`` folds the adapters back into plain modules.

Targets (``LoRAConfig.targets``): module kinds ``attention``, ``dense`` (dense FFNs),
``shared`` (shared experts), ``experts`` (routed experts), ``all`` (every kind the model has),
or patterns (a glob over the whole name, or a regex found in it) over the target matrices'
names: ``blocks.0.attn.wq.weight``, ``blocks.1.ffn.shared.w_in.weight``,
``blocks.1.ffn.experts.w_in``. A kind or pattern that matches nothing is an error, and so is
one that would adapt only one of an FFN's two matrices (the silent partial coverage PEFT users
report for fused experts).

Not adapted: embeddings, the output head, norms, routers (the seed warns that small-data
fine-tunes collapse routing; keep the router frozen), the shared-expert gate, and MLA's
``wkv_b`` (its absorbed decode reads the matrix itself, not through a call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.adapt.lora_experts import LoRAExperts
from moekit.config import check_float, check_int
from moekit.errors import ConfigError, UsageError
from moekit.layers.experts import Experts
from moekit.layers.mlp import MLP, activate
from moekit.layers.moe import MoELayer

KIND_TARGETS = ("attention", "dense", "shared", "experts")
ATTENTION_PROJECTIONS = ("wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a")  # not MLA's wkv_b (see above)


@dataclass
class LoRAConfig:
    rank: int = 8  # r: the adapters' inner width (Hu et al.: 4-8 suffices for attention)
    alpha: float = 16.0  # the low-rank term is scaled by alpha / rank (PEFT's default convention)
    targets: list[str] = field(default_factory=lambda: ["all"])  # kinds or name patterns (module doc)
    dropout: float = 0.0  # dropout on the adapters' input, in training only

    def __post_init__(self) -> None:
        check_int("lora_rank", self.rank)
        check_float("lora_alpha", self.alpha, 0.0, strict=True)
        check_float("lora_dropout", self.dropout)
        if self.dropout >= 1:
            raise ConfigError(f"lora_dropout must be < 1, got {self.dropout}")
        if not isinstance(self.targets, (list, tuple)) or not self.targets or \
                not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"lora_targets must be a non-empty list of kinds or patterns, got {self.targets!r}")
        self.targets = list(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """``nn.Linear`` plus ``lora_B`` [out, r] @ ``lora_A`` [r, in] scaled by alpha / r. The
    frozen ``weight`` (and ``bias``) are the original parameters, so their names stay."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scale, self.dropout = rank, alpha, alpha / rank, dropout
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default: starts at the base output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In x's dtype, as MLP does (a no-op for fp32 and under autocast, which casts itself).
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.weight.to(x.dtype), bias)
        d = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return y + F.linear(F.linear(d, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    @torch.no_grad()
    def to_plain(self) -> nn.Linear:
        """An ``nn.Linear`` holding W + s * B A."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())
        plain.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype),
                                    requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            plain.bias = self.bias
        return plain


class LoRAMLP(nn.Module):
    """``MLP`` (dense FFN or shared experts) with both matrices adapted."""

    def __init__(self, mlp: MLP, cfg: LoRAConfig):
        super().__init__()
        self.activation, self.act_args = mlp.activation, mlp.act_args
        self.w_in = LoRALinear(mlp.w_in, cfg.rank, cfg.alpha, cfg.dropout)
        self.w_out = LoRALinear(mlp.w_out, cfg.rank, cfg.alpha, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation, *self.act_args))

    def to_plain(self) -> MLP:
        mlp = MLP.__new__(MLP)
        nn.Module.__init__(mlp)
        mlp.activation, mlp.act_args = self.activation, self.act_args
        mlp.w_in, mlp.w_out = self.w_in.to_plain(), self.w_out.to_plain()
        return mlp


@dataclass
class LoRAReport:
    """What ``apply_lora`` adapted: target matrix names by kind."""

    rank: int
    matrices: dict[str, list[str]]  # kind -> adapted matrix names

    def line(self) -> str:
        """'LoRA rank 8 (alpha 16) on attention 8 matrices, experts 2 layers (4 matrices)'"""
        parts = [f"{kind} {len(names)} matrices" for kind, names in self.matrices.items() if names]
        return f"LoRA rank {self.rank} on " + ", ".join(parts)


def _candidates(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """Every adaptable matrix: name -> (kind, owning module's path, attribute). FFN matrices
    are owned by their MLP / experts module (adapted whole)."""
    out: dict[str, tuple[str, nn.Module, str]] = {}
    for i, block in enumerate(model.blocks):
        for proj in ATTENTION_PROJECTIONS:
            if isinstance(getattr(block.attn, proj, None), nn.Linear):
                out[f"blocks.{i}.attn.{proj}.weight"] = ("attention", f"blocks.{i}.attn.{proj}", proj)
        ffn = block.ffn
        if isinstance(ffn, MLP):
            for m in ("w_in", "w_out"):
                out[f"blocks.{i}.ffn.{m}.weight"] = ("dense", f"blocks.{i}.ffn", m)
        elif isinstance(ffn, MoELayer):
            if isinstance(getattr(ffn, "shared", None), MLP):
                for m in ("w_in", "w_out"):
                    out[f"blocks.{i}.ffn.shared.{m}.weight"] = ("shared", f"blocks.{i}.ffn.shared", m)
            if isinstance(ffn.experts, (Experts, LoRAExperts)) and not getattr(ffn.experts, "rank", 0):
                for m in ("w_in", "w_out"):
                    out[f"blocks.{i}.ffn.experts.{m}"] = ("experts", f"blocks.{i}.ffn.experts", m)
    return out


def resolve_targets(model: nn.Module, targets: list[str]) -> dict[str, tuple[str, str, str]]:
    """The matrices ``targets`` name -> {name: (kind, owner path, attribute)}; UsageError for a
    target matching nothing or only one matrix of an FFN or expert layer."""
    from moekit.training.freeze import matches

    cand = _candidates(model)
    if not cand:
        raise UsageError("this model has no matrix LoRA can adapt (it is already adapted, or has no such layers)")
    present = {k for k, _, _ in cand.values()}
    chosen: dict[str, tuple[str, str, str]] = {}
    for t in targets:
        if t == "all":
            hit = set(cand)
        elif t in KIND_TARGETS:
            hit = {n for n, (k, _, _) in cand.items() if k == t}
            if not hit:
                raise UsageError(f"--lora-targets {t}: this model has no {t} matrices "
                                 f"(it has {', '.join(k for k in KIND_TARGETS if k in present)})")
        else:
            hit = {n for n in cand if matches(t, n)}
            if not hit:
                raise UsageError(f"--lora-targets {t!r} matches no adaptable matrix (kinds: {', '.join(KIND_TARGETS)}, "
                                 f"all; or names like {next(iter(cand))}, {list(cand)[-1]})")
        chosen.update({n: cand[n] for n in hit})
    _check_whole_ffns(cand, chosen)
    return chosen


def _check_whole_ffns(cand: dict, chosen: dict) -> None:
    owners: dict[str, list[str]] = {}
    for n, (kind, owner, _) in cand.items():
        if kind != "attention":
            owners.setdefault(owner, []).append(n)
    for owner, names in owners.items():
        on = [n for n in names if n in chosen]
        if on and len(on) != len(names):
            off = sorted(set(names) - set(on))
            what = "expert weights" if owner.endswith(".experts") else "FFN matrices"
            raise UsageError(f"--lora-targets would adapt only part of {owner}'s {what} ({', '.join(on)}; not "
                             f"{', '.join(off)}): target both")


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> LoRAReport:
    """Swap the targeted modules of ``model`` for LoRA twins, in place (adapters B = 0: the
    model's outputs are unchanged until they train)."""
    chosen = resolve_targets(model, cfg.targets)
    report = LoRAReport(cfg.rank, {k: [] for k in KIND_TARGETS})
    for owner in dict.fromkeys(o for _, o, _ in chosen.values()):  # in model order, once each
        parent_path, _, attr = owner.rpartition(".")
        parent, module = model.get_submodule(parent_path), model.get_submodule(owner)
        setattr(parent, attr, _twin(module, cfg).train(module.training))
    for name, (kind, _, _) in chosen.items():
        report.matrices[kind].append(name)
    return report


def _twin(module: nn.Module, cfg: LoRAConfig) -> nn.Module:
    if isinstance(module, nn.Linear):
        return LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout)
    if isinstance(module, MLP):
        return LoRAMLP(module, cfg)
    if isinstance(module, LoRAExperts):  # expert dropout already applied: keep it
        return LoRAExperts(module, cfg.rank, cfg.alpha, cfg.dropout, module.expert_dropout)
    return LoRAExperts(module, cfg.rank, cfg.alpha, cfg.dropout)


def apply_expert_dropout(model: nn.Module, p: float) -> int:
    """Dropout ``p`` on every routed expert's hidden activations in training (Switch: 0.4 when
    fine-tuning) -> the number of MoE layers it applies to. Eval mode is unchanged."""
    layers = model.moe_layers()
    for layer in layers:
        if isinstance(layer.experts, LoRAExperts):
            layer.experts.expert_dropout = p
        elif isinstance(layer.experts, Experts):
            layer.experts = LoRAExperts(layer.experts, expert_dropout=p).train(layer.training)
        else:
            raise UsageError(f"expert dropout needs float experts, not {type(layer.experts).__name__}")
    return len(layers)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its matrix and put plain modules back, in place -> adapted
    modules merged. The merged model computes what the adapted one did (up to rounding)."""
    twins = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAMLP, LoRAExperts))]
    outer = [(n, m) for n, m in twins if not any(n.startswith(o + ".") for o, _ in twins)]  # a LoRAMLP's own
    for name, module in outer:
        parent_path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, module.to_plain().train(module.training))
    return sum(1 for _, m in outer if not isinstance(m, LoRAExperts) or m.rank)


def is_lora_parameter(name: str) -> bool:
    """An adapter parameter (``...lora_A``, ``...w_in_lora_B``), as opposed to a base weight."""
    return "lora_" in name.rpartition(".")[2]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: {parameter name: tensor}."""
    return {n: p.detach() for n, p in model.named_parameters() if is_lora_parameter(n)}


__all__ = ["LoRAConfig", "LoRALinear", "LoRAMLP", "LoRAReport", "apply_lora", "apply_expert_dropout", "merge_lora",
           "resolve_targets", "is_lora_parameter", "lora_state_dict", "KIND_TARGETS"]
