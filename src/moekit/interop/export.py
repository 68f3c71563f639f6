"""Hugging Face model folders out: ``save_pretrained`` (``model.save_pretrained`` calls it).

It reads the model only through ``model.cfg``, its ``state_dict`` and the embedding's dtype, so
this module does not import ``moekit.model`` (which imports it): the loading side, ``hf.py``,
builds models and imports both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moekit.config import ModelConfig
from moekit.errors import ModelFolderError
from moekit.interop.checkpoint import INDEX, SINGLE, parse_size, remove_stale, write_json, write_safetensors
from moekit.interop.family import ALIASES, Family, HFConfig, architecture_of
from moekit.interop.names import EXPERT_LAYOUTS, PER_EXPERT, WHOLE, Piece, Unmapped, export_pieces, hf_piece_shape
from moekit.interop.registry import family_for_architecture, supported_architectures

if TYPE_CHECKING:
    from moekit.model import MoETransformer

ROUTER = ".ffn.router"  # moekit module path of every router (kept fp32)


@dataclass
class _Out:
    hf: str
    source: str  # moekit tensor name
    piece: Piece
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


def save_pretrained(
    model: MoETransformer,
    path: str | Path,
    *,
    architecture: str | None = None,
    max_shard_size: int | str = "5GB",
    expert_layout: str = PER_EXPERT,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` as a Hugging Face folder: config.json, then safetensors shards of at most
    ``max_shard_size`` with ``model.safetensors.index.json`` when there are several.

    ``architecture`` defaults to the one the model was loaded from (``cfg.hf_architecture``);
    ``expert_layout`` "per_expert" writes the published layout (one tensor per expert, what
    transformers' save_pretrained writes), "fused" the 3-D gate_up_proj / down_proj tensors.
    ``dtype`` defaults to the embedding's. Every file is written atomically; weight files of an
    earlier save into the same folder that this one does not rewrite are removed.
    """
    cfg = model.cfg
    arch = architecture or cfg.hf_architecture
    if arch is None:
        raise ValueError(
            "this model has no Hugging Face architecture (it was not loaded by from_pretrained); pass "
            f"architecture=, one of: {', '.join(supported_architectures())}"
        )
    family = family_for_architecture(arch)
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {', '.join(EXPERT_LAYOUTS)}; got {expert_layout!r}")
    hf = _export_config(model, cfg, family, arch)
    out_dtype = dtype or model.embed.weight.dtype
    outs = _plan_export(model, cfg, family, hf, expert_layout, out_dtype)
    hf["torch_dtype" if "torch_dtype" in hf and "dtype" not in hf else "dtype"] = str(out_dtype).removeprefix("torch.")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    written = _write_shards(model, outs, folder, parse_size(max_shard_size))
    write_json(folder / "config.json", hf)
    remove_stale(folder, written)


def _export_config(model: MoETransformer, cfg: ModelConfig, family: Family, arch: str) -> HFConfig:
    """The family's semantic keys, merged into the config.json the model came from (token ids,
    tokenizer-related keys and the like pass through) when it came from the same architecture."""
    semantic = family.to_hf(cfg)
    semantic["architectures"] = [arch]
    base = getattr(model, "hf_config", None)
    if not base or architecture_of(base) != arch:
        return semantic
    out = copy.deepcopy(base)
    for key in ("auto_map", "quantization_config"):  # remote code and quantization are not written
        out.pop(key, None)
    for key in ("rope_interleave",):  # on-disk layout choices of the source stay as they were
        if key in out:
            semantic[key] = out[key]
    if "rope_parameters" not in out:  # a legacy config: keep its rope_theta / rope_scaling keys
        params = dict(semantic.pop("rope_parameters"))
        out["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type")
        out["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **params}
    for key in list(semantic):  # write under the spelling the base uses
        alias = next((a for a in ALIASES.get(key, ()) if a in out and key not in out), None)
        if alias is not None:
            semantic[alias] = semantic.pop(key)
    out.update(semantic)
    return out


def _plan_export(model, cfg, family: Family, hf: HFConfig, layout: str, out_dtype: torch.dtype) -> list[_Out]:
    outs, unmapped = [], []
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it from the embedding
        try:
            pieces = export_pieces(name, tuple(t.shape), cfg, family, hf, layout)
        except Unmapped:
            unmapped.append(name)
            continue
        module = name.rsplit(".", 1)[0]
        keep32 = (family.fp32_router and ROUTER + "." in name) or module.endswith(family.fp32_modules)
        dtype = (torch.float32 if keep32 else out_dtype) if t.is_floating_point() else t.dtype  # int: a hash table
        for p in pieces:
            outs.append(_Out(p.hf, name, p, hf_piece_shape(p, tuple(t.shape)), dtype))
    if unmapped:
        raise ModelFolderError(f"{architecture_of(hf)} has no place for moekit tensor(s) {unmapped}")
    return outs


def _write_shards(model: MoETransformer, outs: list[_Out], folder: Path, max_bytes: int) -> set[str]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for o in outs:
        if shards[-1] and size + o.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    state = model.state_dict()
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, shard in zip(names, shards):
        tensors = {o.hf: _export_tensor(state[o.source], o) for o in shard}  # one shard in memory at a time
        write_safetensors(folder / file, tensors)
        weight_map.update({o.hf: file for o in shard})
        del tensors
    if n > 1:
        total = sum(o.nbytes for o in outs)
        write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        return {*names, INDEX}
    return set(names)


def _export_tensor(t: torch.Tensor, o: _Out) -> torch.Tensor:
    part = t if o.piece.index == WHOLE else t[o.piece.index]
    part = o.piece.transform.to_hf(part.detach())
    return torch.empty(part.shape, dtype=o.dtype, device="cpu").copy_(part)  # contiguous, owns its memory


__all__ = ["save_pretrained", "ROUTER"]
