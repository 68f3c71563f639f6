"""Which parameters a fine-tune trains: presets by module kind, plus ``--freeze`` patterns.

ST-MoE (Zoph et al. 2022, sec. 4.4) fine-tunes with the MoE parameters frozen (~80 % of the
model) at nearly no quality cost; Unsloth and others train only attention, only the experts,
or only the router. A preset names the module kinds that train; ``freeze`` patterns then
freeze more by parameter name. Every fine-tune reports its coverage (trainable parameters
per module kind), and a target that matches nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from moekit.errors import UsageError

KINDS = ("embedding", "attention", "norm", "dense_ffn", "router", "experts", "shared", "lm_head")
MOE_KINDS = ("router", "experts", "shared")
PRESETS: dict[str, tuple[str, ...]] = {
    "all": KINDS,
    "non-moe": tuple(k for k in KINDS if k not in MOE_KINDS),  # ST-MoE: freeze the MoE parameters
    "attention": ("attention",),
    "experts": ("experts",),
    "router": ("router",),
    "shared": ("shared",),
    "lora": (),  # the adapters alone (adapt/lora.py), whatever kind they sit in
}


def module_kind(name: str) -> str:
    """The module kind of a ``MoETransformer`` parameter name (one of ``KINDS``)."""
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if ".attn." in name:
        return "attention"
    if name.endswith("norm.weight"):  # attn_norm, ffn_norm and the final norm
        return "norm"
    for part, kind in ((".ffn.router.", "router"), (".ffn.experts.", "experts"), (".ffn.shared", "shared")):
        if part in name:
            return kind
    if ".ffn." in name:
        return "dense_ffn"
    raise ValueError(f"no module kind for parameter {name!r}")


def matches(pattern: str, name: str) -> bool:
    """A glob over the whole name (``blocks.0.*``) or a regular expression found in it (``experts``)."""
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return False


def select_trainable(model: nn.Module, preset: str = "all", freeze: Sequence[str] = ()) -> set[str]:
    """The names of the parameters that train; UsageError when a target matches nothing, or
    when an MoE layer would train one of its expert matrices but not the other."""
    if preset not in PRESETS:
        raise UsageError(f"unknown --train preset {preset!r}; known: {', '.join(PRESETS)}")
    from moekit.adapt.lora import is_lora_parameter

    names = [n for n, _ in model.named_parameters()]
    kinds = {n: module_kind(n) for n in names}
    if preset == "lora":
        chosen = {n for n in names if is_lora_parameter(n)}
    else:
        chosen = {n for n in names if kinds[n] in PRESETS[preset] and not is_lora_parameter(n)}
    if not chosen and preset == "lora":
        raise UsageError("--train lora: the model has no LoRA adapters (adapt.lora.apply_lora adds them)")
    if not chosen:
        raise UsageError(f"--train {preset} matches no parameter of this model "
                         f"(it has {', '.join(sorted(set(kinds.values())))})")
    for pattern in freeze:
        hit = {n for n in names if matches(pattern, n)}
        if not hit:
            raise UsageError(f"--freeze {pattern!r} matches no parameter name (e.g. {names[0]}, {names[-1]})")
        chosen -= hit
    if not chosen:
        raise UsageError(f"--train {preset} with --freeze {' '.join(freeze)} leaves nothing to train")
    _check_whole_experts(names, chosen)
    return chosen


def _check_whole_experts(names: list[str], chosen: set[str]) -> None:
    """Expert weights train whole per layer (gate/up and down together): a half-trained expert is
    the silent partial coverage PEFT users report for fused experts."""
    groups: dict[tuple[str, bool], list[str]] = {}  # (layer, adapters?) -> parameter names
    for n in names:
        if ".ffn.experts." in n:  # base matrices and LoRA adapters are separate groups, each whole
            groups.setdefault((n.split(".ffn.experts.")[0], "lora_" in n.rpartition(".")[2]), []).append(n)
    for (layer, adapters), params in groups.items():
        on = [p for p in params if p in chosen]
        if on and len(on) != len(params):
            off = sorted(set(params) - set(on))
            what = "LoRA adapters of its expert weights" if adapters else "expert weights"
            raise UsageError(f"only part of {layer}'s {what} would train ({', '.join(on)}; frozen: "
                             f"{', '.join(off)}): train or freeze an expert layer whole")


def coverage(model: nn.Module, trainable: set[str] | None = None) -> dict[str, tuple[int, int]]:
    """{kind: (trainable, total) parameter counts}; ``trainable`` None = by ``requires_grad``."""
    out: dict[str, list[int]] = {}
    for n, p in model.named_parameters():
        row = out.setdefault(module_kind(n), [0, 0])
        row[1] += p.numel()
        if (p.requires_grad if trainable is None else n in trainable):
            row[0] += p.numel()
    return {k: (v[0], v[1]) for k, v in sorted(out.items(), key=lambda kv: KINDS.index(kv[0]))}


def coverage_line(cov: dict[str, tuple[int, int]]) -> str:
    """'trainable 1.20M of 4.50M parameters (26.7%): attention 1.20M/1.20M, experts 0/3.10M, ...'"""
    on, total = sum(v[0] for v in cov.values()), sum(v[1] for v in cov.values())
    parts = ", ".join(f"{k} {_human(a)}/{_human(b)}" for k, (a, b) in cov.items())
    return f"trainable {_human(on)} of {_human(total)} parameters ({100 * on / max(total, 1):.1f}%): {parts}"


def _human(n: int) -> str:
    return "0" if n == 0 else f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


__all__ = ["KINDS", "MOE_KINDS", "PRESETS", "module_kind", "matches", "select_trainable", "coverage", "coverage_line"]
