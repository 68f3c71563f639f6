"""The declarative map between moekit's tensors and Hugging Face checkpoint tensors.

Every moekit tensor is made of one or more ``Piece``s: a checkpoint tensor, the slice of the
moekit tensor it fills, and an invertible transform (identity, or a row permutation).
Loading copies ``transform.to_moekit(ckpt[piece.hf])`` into ``tensor[piece.index]``; exporting
writes ``transform.to_hf(tensor[piece.index])`` under ``piece.hf``.

Shape legend: E experts, D model dim, F expert hidden width (moekit fuses gate|up into 2F).

    moekit                             Hugging Face (under model.layers.{i}.)
    experts.w_in  [E, 2F, D]           {moe}.experts.{e}.{gate,up}.weight [F, D] each, stacked
                                       or {moe}.experts.gate_up_proj [E, 2F, D]
    experts.w_out [E, D, F]            {moe}.experts.{e}.{down}.weight [D, F]
                                       or {moe}.experts.down_proj [E, D, F]
    ffn.w_in [2F, D] (dense / shared)  mlp.gate_proj.weight rows [0, F) and mlp.up_proj.weight rows [F, 2F)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

import torch

from moekit.config import ModelConfig
from moekit.interop.family import Family, HFConfig

PER_EXPERT, FUSED = "per_expert", "fused"
EXPERT_LAYOUTS = (PER_EXPERT, FUSED)
FUSED_MODULE = "mlp"  # transformers 5 keeps fused experts (and the router) under mlp.*


@dataclass(frozen=True)
class Identity:
    def to_moekit(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def to_hf(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape


@dataclass(frozen=True, eq=False)
class RowPermutation:
    """moekit = hf[perm] along dim 0 (DeepSeek's interleaved RoPE rows -> half-split)."""

    perm: torch.Tensor

    def to_moekit(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.perm]

    def to_hf(self, t: torch.Tensor) -> torch.Tensor:
        return t[torch.argsort(self.perm)]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape


@dataclass(frozen=True, eq=False)
class Permuted:
    """moekit = hf with its last two dims swapped when ``transpose``, then indexed by ``perm``
    (None: kept in order) along ``dim``. GPT-OSS stores experts as [E, in, out] with gate and
    up interleaved column by column; moekit's are [E, out, in] with gate rows, then up rows."""

    perm: torch.Tensor | None
    dim: int = -2
    transpose: bool = False

    def to_moekit(self, t: torch.Tensor) -> torch.Tensor:
        t = t.transpose(-1, -2) if self.transpose else t
        return t if self.perm is None else t.index_select(self.dim, self.perm)

    def to_hf(self, t: torch.Tensor) -> torch.Tensor:
        t = t if self.perm is None else t.index_select(self.dim, torch.argsort(self.perm))
        return t.transpose(-1, -2) if self.transpose else t

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-2], shape[-1], shape[-2]) if self.transpose else shape


Transform = Union[Identity, RowPermutation, Permuted]
IDENTITY = Identity()
WHOLE: tuple = ()  # the index of a piece that is the whole moekit tensor


@dataclass(frozen=True)
class Piece:
    hf: str  # checkpoint tensor name
    index: tuple = WHOLE  # which part of the moekit tensor it fills
    transform: Transform = IDENTITY


@dataclass(frozen=True)
class GateUp:
    """A fused [gate; up] weight (moekit [2F, D]) from two checkpoint tensors [F, D]."""

    gate: str
    up: str


@dataclass(frozen=True)
class Experts:
    """Stacked expert weights: "w_in" (gate|up fused) or "w_out"."""

    which: str


GLOBAL = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}

# moekit suffix under blocks.{i}. -> checkpoint suffix under model.layers.{i}.
GQA = {
    "attn.wq.weight": "self_attn.q_proj.weight", "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.weight": "self_attn.k_proj.weight", "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.weight": "self_attn.v_proj.weight", "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.weight": "self_attn.o_proj.weight", "attn.wo.bias": "self_attn.o_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
    "attn.sinks": "self_attn.sinks",
}
MLA = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
}
BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_in.weight": GateUp("{dense}.gate_proj.weight", "{dense}.up_proj.weight"),
    "ffn.w_out.weight": "{dense}.down_proj.weight",
    "ffn.router.weight": "{moe}.{router}.weight",
    "ffn.router.bias": "{moe}.{router}.bias",
    "ffn.router.expert_bias": "{moe}.{router}.e_score_correction_bias",
    "ffn.experts.w_in": Experts("w_in"),
    "ffn.experts.w_out": Experts("w_out"),
    "ffn.experts.b_in": Experts("b_in"),
    "ffn.experts.b_out": Experts("b_out"),
    "ffn.shared.w_in.weight": GateUp("{moe}.{shared}.gate_proj.weight", "{moe}.{shared}.up_proj.weight"),
    "ffn.shared.w_out.weight": "{moe}.{shared}.down_proj.weight",
    "ffn.shared_gate.weight": "{moe}.shared_expert_gate.weight",
}
_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


class Unmapped(KeyError):
    """A moekit tensor with no checkpoint counterpart in this family."""


def pieces(
    name: str, shape: tuple[int, ...], cfg: ModelConfig, family: Family, hf: HFConfig, module: str, layout: str
) -> list[Piece]:
    """The pieces of moekit tensor ``name`` with the MoE module named ``module`` and experts in ``layout``."""
    glob, block = family.tables or (GLOBAL, None)  # a family with its own whole name map (DeepSeek-V4)
    if name in glob:
        return [Piece(family.prefix + glob[name])]
    match = _BLOCK_NAME.fullmatch(name)
    if match is None:
        raise Unmapped(name)
    layer, suffix = match.groups()
    attn_table = MLA if cfg.attention == "mla" else GQA
    if block is not None:
        rule = block.get(suffix)
    else:
        rule = attn_table.get(suffix) if suffix.startswith("attn.") else BLOCK.get(suffix)
    if rule is None:
        raise Unmapped(name)
    prefix = f"{family.prefix}model.layers.{layer}."
    naming = family.naming
    fill = dict(moe=module, shared=naming.shared, router=naming.router, dense=naming.dense)
    if isinstance(rule, str):
        perm = family.row_permutation(suffix, cfg, hf) if family.row_permutation else None
        return [Piece(prefix + rule.format(**fill), WHOLE, IDENTITY if perm is None else RowPermutation(perm))]
    if isinstance(rule, GateUp):
        half = shape[0] // 2
        return [
            Piece(prefix + rule.gate.format(**fill), (slice(0, half),)),
            Piece(prefix + rule.up.format(**fill), (slice(half, 2 * half),)),
        ]
    if family.expert_pieces is not None:  # a family with its own expert layout (GPT-OSS)
        return family.expert_pieces(rule.which, shape, prefix + module + ".experts.")
    if rule.which not in ("w_in", "w_out"):
        raise Unmapped(name)  # expert biases: only families with their own layout have them
    return _expert_pieces(rule.which, shape, prefix + module + ".experts.", naming.expert_proj, layout)


def _expert_pieces(which: str, shape: tuple[int, ...], prefix: str, proj: tuple[str, str, str], layout: str):
    if layout == FUSED:
        return [Piece(prefix + ("gate_up_proj" if which == "w_in" else "down_proj"))]
    gate, up, down = proj
    E = shape[0]
    if which == "w_out":  # [E, D, F] <- down [D, F] per expert
        return [Piece(f"{prefix}{e}.{down}.weight", (e,)) for e in range(E)]
    F = shape[1] // 2  # [E, 2F, D] <- gate [F, D] and up [F, D] per expert
    out = []
    for e in range(E):
        out.append(Piece(f"{prefix}{e}.{gate}.weight", (e, slice(0, F))))
        out.append(Piece(f"{prefix}{e}.{up}.weight", (e, slice(F, 2 * F))))
    return out


def load_alternatives(name, shape, cfg, family, hf) -> list[list[Piece]]:
    """Every way ``name`` may be stored: MoE module name x expert layout, published layout first."""
    seen, out = set(), []
    for module in dict.fromkeys((family.naming.moe, FUSED_MODULE)):
        for layout in EXPERT_LAYOUTS:
            alt = pieces(name, shape, cfg, family, hf, module, layout)
            spellings = [alt]
            if family.respell is not None:
                spellings.append([Piece(family.respell(p.hf), p.index, p.transform) for p in alt])
            for alt in spellings:
                key = tuple(p.hf for p in alt)
                if key not in seen:
                    seen.add(key)
                    out.append(alt)
    return out


def export_pieces(name, shape, cfg, family, hf, layout: str) -> list[Piece]:
    """Where ``name`` goes on export: the published module name for per-expert tensors,
    transformers 5's ``mlp`` for the fused layout."""
    module = family.naming.moe if layout == PER_EXPERT else FUSED_MODULE
    return pieces(name, shape, cfg, family, hf, module, layout)


def hf_piece_shape(piece: Piece, moekit_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape that ``piece`` must have, given the moekit tensor's shape."""
    part = torch.empty(moekit_shape, device="meta")[piece.index].shape
    return tuple(piece.transform.hf_shape(tuple(part)))


__all__ = [
    "Piece", "Identity", "RowPermutation", "Permuted", "Unmapped", "EXPERT_LAYOUTS", "PER_EXPERT", "FUSED",
    "pieces", "load_alternatives", "export_pieces", "hf_piece_shape",
]
