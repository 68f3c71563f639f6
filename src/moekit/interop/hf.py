"""Hugging Face model folders in: ``moekit.from_pretrained`` (out: ``export.py``, ``model.save_pretrained``).

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

import warnings
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.errors import ModelFolderError
from moekit.fileio import read_json_object
from moekit.interop.checkpoint import DTYPES, Checkpoint
from moekit.interop.export import ROUTER, save_pretrained
from moekit.interop.family import Family, HFConfig
from moekit.interop.names import WHOLE, Piece, hf_piece_shape, load_alternatives
from moekit.interop.registry import family_for
from moekit.meta import materialize, on_meta
from moekit.model import MoETransformer


def read_hf_config(folder: Path) -> HFConfig:
    path = folder / "config.json" if folder.is_dir() else folder
    if not path.is_file():
        raise ModelFolderError(f"no config.json in {folder}")
    return read_json_object(path)


def from_pretrained(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
    check_memory: bool = True, check_finite: bool = True, quantize=None, reference: bool = False, offload=None,
) -> MoETransformer:
    """Load a local Hugging Face model folder into a ``MoETransformer`` (in eval mode, as
    transformers returns it). ``dtype`` None keeps the checkpoint's dtype (that of its embedding).

    Before allocating, the model's bytes are compared with the memory free on ``device``
    (``check_memory=False`` skips it; see ``moekit.memory``); every tensor is checked for
    NaN/inf as it is copied (``check_finite=False`` skips it), and a bad one is named.

    ``quantize`` (8, 4 or a ``moekit.quant.QuantConfig``) quantizes the experts at load; a folder
    written by ``moekit quantize`` loads quantized as it is. ``reference`` runs int4 through the
    dequantize-then-matmul reference, for a torch that lacks the int4 kernel.

    ``offload`` (a ``moekit.offload.OffloadConfig``) streams the routed experts into its store
    one layer at a time (quantized as they go with ``quantize``), so a model bigger than memory
    loads: only the rest and one layer's experts are ever held (``moekit.offload.stream``).
    """
    if offload is not None:
        from moekit.offload.stream import load_offloaded

        kind = "quantized" if "quantization" in read_hf_config(Path(path)) else "hf"
        return load_offloaded(path, kind, offload, dtype, device, check_memory=check_memory,
                              check_finite=check_finite, quantize=quantize, reference=reference)
    model = _load(Path(path), dtype, device, check_memory, check_finite, reference)
    if quantize is not None:
        from moekit.quant.convert import QuantConfig, quantize_at_load

        quantize_at_load(model, QuantConfig(bits=quantize, reference=reference) if isinstance(quantize, int) else quantize)
    return model


def _load(folder: Path, dtype, device, check_memory: bool, check_finite: bool, reference: bool) -> MoETransformer:
    from moekit.memory import check_fits
    hf = read_hf_config(folder)
    if "quantization" in hf:  # a folder written by `moekit quantize` (moekit.quant.checkpoint)
        from moekit.quant.checkpoint import load_quantized

        return load_quantized(folder, dtype, device, reference)
    family = family_for(hf)
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ModelFolderError(f"{folder}: quantized checkpoints ({method}) are not supported; dequantize to bf16 first")
    cfg = family.to_config(hf)
    with on_meta():
        meta = MoETransformer(cfg)
    with Checkpoint(folder, pread=True) as ckpt:  # not the map: its read pages would count in RSS
        plan = _plan_load(_shapes(meta), cfg, family, hf, ckpt)
        dtype = dtype or DTYPES[ckpt.entries[plan["embed.weight"][0].hf].dtype]  # as the checkpoint spells it
        check_fits(cfg, str(device or "cpu"), dtype=str(dtype), force=not check_memory, what=str(folder))
        model = _materialize(meta, dtype, torch.device(device or "cpu"), family.fp32_modules)
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
    if entry.dtype not in DTYPES and not (entry.dtype == "I64" and name.endswith(".tid2eid")):  # hash table
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
        warnings.warn(f"skipped {len(skipped)} {family.skip_note.format(n_layers=cfg.n_layers)}", stacklevel=4)


def _materialize(meta: MoETransformer, dtype: torch.dtype, device: torch.device,
                 fp32_modules: tuple[str, ...] = ()) -> MoETransformer:
    """Allocate the meta model on ``device`` (uninitialized: the plan fills every tensor); routers
    and the family's ``fp32_modules`` stay float32."""
    model = meta.to(dtype)  # still meta: free
    for name, module in model.named_modules():
        if name.endswith((ROUTER, *fp32_modules)):
            module.float()
    materialize(model, device)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight  # materialize gives each module its own tensor
    return model


@torch.no_grad()
def _copy(model: MoETransformer, plan: dict[str, list[Piece]], ckpt: Checkpoint, check_finite: bool = True) -> None:
    state = model.state_dict(keep_vars=True)
    for name, pieces in plan.items():
        copy_pieces(state[name], pieces, ckpt, check_finite)


@torch.no_grad()
def copy_pieces(target: torch.Tensor, pieces: list[Piece], ckpt: Checkpoint, check_finite: bool = True) -> None:
    """Fill ``target`` (one moekit tensor) from its checkpoint pieces, one tensor read at a time."""
    for piece in pieces:
        dst = target if piece.index == WHOLE else target[piece.index]
        src = ckpt.get(piece.hf)
        if check_finite and not bool(torch.isfinite(src).all()):
            bad = int((~torch.isfinite(src)).sum())
            raise ModelFolderError(f"tensor {piece.hf!r} in {ckpt.where(piece.hf)} holds {bad} NaN/inf value(s); "
                                   "nothing was returned (check_finite=False loads it anyway)")
        dst.copy_(piece.transform.to_moekit(src))


__all__ = ["from_pretrained", "save_pretrained", "read_hf_config"]
