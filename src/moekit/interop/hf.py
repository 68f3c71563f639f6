"""Hugging Face model folders in and out: ``moekit.from_pretrained`` and ``model.save_pretrained``.

Loading runs in this order, and allocates nothing until every check has passed (nothing loads half):

1. config.json -> the architecture's family (an unsupported one is an error listing the
   supported ones) -> ``ModelConfig``.
2. The safetensors headers: a shard the index lists but the folder lacks is an error naming it.
3. The plan: build the model on the meta device (free), find every moekit tensor's pieces in the
   checkpoint (see ``names.py``), check their shapes; every checkpoint tensor must be used, or be a
   known skip (DeepSeek-V3's multi-token-prediction layer, with a note).
4. Allocate in the requested dtype and device and copy piece by piece: one checkpoint tensor is in
   memory at a time, on top of the model itself.

Router weights (and DeepSeek-V3's selection bias) stay float32 in a bf16/fp16 model: moekit
routes in fp32, and a bf16 bias (spacing 2^-7 near 1) would change which experts are chosen.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.errors import ModelFolderError
from moekit.fileio import read_json_object
from moekit.interop.checkpoint import (
    DTYPES, INDEX, SINGLE, Checkpoint, parse_size, remove_stale, write_json, write_safetensors,
)
from moekit.interop.family import ALIASES, Family, HFConfig, architecture_of
from moekit.interop.names import (
    EXPERT_LAYOUTS, PER_EXPERT, WHOLE, Piece, Unmapped, export_pieces, hf_piece_shape, load_alternatives,
)
from moekit.interop.registry import family_for, family_for_architecture, supported_architectures
from moekit.model import MoETransformer

ROUTER = ".ffn.router"  # moekit module path of every router (kept fp32)


def read_hf_config(folder: Path) -> HFConfig:
    path = folder / "config.json" if folder.is_dir() else folder
    if not path.is_file():
        raise ModelFolderError(f"no config.json in {folder}")
    return read_json_object(path)


def from_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
    check_memory: bool = True, check_finite: bool = True,
) -> MoETransformer:
    """Load a local Hugging Face model folder into a ``MoETransformer`` (in eval mode, as
    transformers returns it). ``dtype`` None keeps the checkpoint's dtype (that of its embedding).

    Before allocating, the model's bytes are compared with the memory free on ``device``
    (``check_memory=False`` skips it; see ``moekit.memory``); every tensor is checked for
    NaN/inf as it is copied (``check_finite=False`` skips it), and a bad one is named.
    """
    from moekit.memory import check_fits
    folder = Path(path)
    hf = read_hf_config(folder)
    if "quantization" in hf:  # a folder written by `moekit quantize` (moekit.quant.checkpoint)
        from moekit.quant.checkpoint import load_quantized

        return load_quantized(folder, dtype, device)
    family = family_for(hf)
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ModelFolderError(f"{folder}: quantized checkpoints ({method}) are not supported; dequantize to bf16 first")
    cfg = family.to_config(hf)
    with torch.device("meta"):
        meta = MoETransformer(cfg)
    with Checkpoint(folder) as ckpt:
        plan = _plan_load(_shapes(meta), cfg, family, hf, ckpt)
        dtype = dtype or DTYPES[ckpt.entries["model.embed_tokens.weight"].dtype]
        check_fits(cfg, str(device or "cpu"), dtype=str(dtype), force=not check_memory, what=str(folder))
        model = _materialize(meta, dtype, torch.device(device or "cpu"))
        _copy(model, plan, ckpt, check_finite)
    model.hf_config = hf
    return model.eval()


def _shapes(model: MoETransformer) -> dict[str, tuple[int, ...]]:
    """Every tensor to fill: parameters and persistent buffers, the tied output matrix once."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _plan_load(shapes, cfg: ModelConfig, family: Family, hf: HFConfig, ckpt: Checkpoint) -> dict[str, list[Piece]]:
    plan, used = {}, set()
    for name, shape in shapes.items():
        alternatives = load_alternatives(name, shape, cfg, family, hf)
        found = [sum(p.hf in ckpt.entries for p in alt) for alt in alternatives]
        best = alternatives[found.index(max(found))]
        missing = [p.hf for p in best if p.hf not in ckpt.entries]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelFolderError(ckpt.missing_message(missing[0], name) + more)
        for piece in best:
            _check_entry(piece, shape, name, ckpt)
        used.update(p.hf for p in best)
        plan[name] = best
    _check_all_used(set(ckpt.entries) - used, cfg, family)
    return plan


def _check_entry(piece: Piece, shape: tuple[int, ...], name: str, ckpt: Checkpoint) -> None:
    entry = ckpt.entries[piece.hf]
    want = hf_piece_shape(piece, shape)
    if entry.shape != want:
        raise ModelFolderError(
            f"tensor {piece.hf!r} in {entry.file} has shape {list(entry.shape)}, but config.json implies "
            f"{list(want)} (for {name})"
        )
    if entry.dtype not in DTYPES:
        raise ModelFolderError(f"tensor {piece.hf!r} in {entry.file} has dtype {entry.dtype}; only float checkpoints load")


def _check_all_used(unused: set[str], cfg: ModelConfig, family: Family) -> None:
    skipped = sorted(n for n in unused if family.skipped is not None and family.skipped(n, cfg))
    ignored = {n for n in unused if n.endswith("rotary_emb.inv_freq")}  # derived buffers some exports keep
    if cfg.tie_embeddings:
        ignored.add("lm_head.weight")  # the tied copy of the embedding
    unmapped = sorted(unused - set(skipped) - ignored)
    if unmapped:
        shown = ", ".join(repr(n) for n in unmapped[:8]) + (f", ... ({len(unmapped)} in all)" if len(unmapped) > 8 else "")
        raise ModelFolderError(f"checkpoint tensor(s) that map to nothing in moekit (nothing was loaded): {shown}")
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} multi-token-prediction tensor(s) (model.layers.{cfg.n_layers}.*): "
            "they are not part of the language model",
            stacklevel=4,
        )


def _materialize(meta: MoETransformer, dtype: torch.dtype, device: torch.device) -> MoETransformer:
    """Allocate the meta model on ``device`` (uninitialized: the plan fills every tensor)."""
    model = meta.to(dtype)  # still meta: free
    for name, module in model.named_modules():
        if name.endswith(ROUTER):
            module.float()
    model.to_empty(device=device)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # to_empty gives each module its own tensor
    for module in model.modules():
        for buf in module.buffers(recurse=False):
            buf.zero_()  # persistent ones are then loaded; the rest (load counters) start at zero
        for attr, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:  # e.g. MoELayer.aux_loss
                setattr(module, attr, torch.zeros(value.shape, dtype=value.dtype, device=device))
    return model


@torch.no_grad()
def _copy(model: MoETransformer, plan: dict[str, list[Piece]], ckpt: Checkpoint, check_finite: bool = True) -> None:
    state = model.state_dict(keep_vars=True)
    for name, pieces in plan.items():
        target = state[name]
        for piece in pieces:
            dst = target if piece.index == WHOLE else target[piece.index]
            src = ckpt.get(piece.hf)
            if check_finite and not bool(torch.isfinite(src).all()):
                bad = int((~torch.isfinite(src)).sum())
                raise ModelFolderError(f"tensor {piece.hf!r} in {ckpt.where(piece.hf)} holds {bad} NaN/inf value(s); "
                                       "nothing was returned (check_finite=False loads it anyway)")
            dst.copy_(piece.transform.to_moekit(src))


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
        keep32 = family.fp32_router and ROUTER + "." in name
        for p in pieces:
            outs.append(_Out(p.hf, name, p, hf_piece_shape(p, tuple(t.shape)), torch.float32 if keep32 else out_dtype))
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


__all__ = ["from_pretrained", "save_pretrained", "read_hf_config"]
