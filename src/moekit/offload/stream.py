"""Load a model folder straight into an offloaded model, one MoE layer of experts at a time.

Loading the whole model and offloading after (``runtime.offload_model``) needs RAM for every
expert: exactly what a model bigger than memory lacks. ``load_offloaded`` never holds more
than one layer's experts (``generate``/``chat``/``serve --expert-cache-gb``,
``load_for_inference(..., offload=)``, ``from_pretrained(..., offload=)``):

1. Read the folder's config and build the model on the meta device (free); check every
   checkpoint tensor's name and shape against it, and that the budget holds one expert per
   MoE layer (from the layout of the meta experts), before anything is read or written.
2. For each MoE layer in order: read its experts' checkpoint tensors (Hugging Face names
   through ``interop.names``, per expert or fused 3-D; moekit names in run and quantized
   folders), assemble ``w_in`` [E, H, D] and ``w_out`` [E, D, F] in the model's dtype,
   quantize them (``--quantize``), write the layer to the store, and let them go.
3. Allocate everything else (embeddings, attention, norms, routers, shared experts, dense
   FFNs) and fill it the way the in-memory loader does: same dtypes, same casts.
4. Put an ``OffloadedExperts`` over a ``LayerCache`` in each MoE block (``runtime.attach``).

Peak memory: non-expert weights + one layer's experts (and its quantized and serialized
copies while it is written) + the cache. The model is the one ``offload_model`` makes of
the in-memory load, bit for bit (tests/test_offload_stream.py).

Not streamed (loaded whole, then offloaded, with a note): LoRA runs (the adapters are merged
into the experts) and sharded (distributed) checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from moekit.errors import ConfigError
from moekit.interop.checkpoint import Checkpoint
from moekit.interop.names import Piece
from moekit.meta import on_meta
from moekit.model import MoETransformer
from moekit.offload.budget import resident_bytes, resolve_budget
from moekit.offload.runtime import OffloadConfig, attach, check_templates, moe_blocks, slots_per_layer
from moekit.offload.store import DiskStore, ExpertLayout, RamStore, check_matches, write_layer, write_manifest
from moekit.quant.convert import QuantConfig, quantize_model
from moekit.quant.modules import QuantizedExperts, quantize_weight

_EXPERTS = re.compile(r"blocks\.(\d+)\.ffn\.experts\.(.+)")
NOT_STREAMED = "lora", "sharded"  # what falls back to a whole load (module docstring)


class _Source:
    """One folder kind: the meta model, where each tensor comes from, and how the non-expert
    part is materialized. ``plan`` maps moekit names to checkpoint pieces (float tensors)."""

    meta: MoETransformer
    ckpt: Checkpoint
    plan: dict[str, list[Piece]]
    expert_shapes: dict[str, tuple[int, ...]]  # "blocks.{i}.ffn.experts.w_in" -> [E, H, D], ...
    dtype: torch.dtype  # the experts' float dtype
    rest_dtype: torch.dtype  # the non-expert weights' (and so the KV cache's) dtype
    quantization: QuantConfig | None = None  # the folder's own (a `moekit quantize` folder)

    def expert_state(self, layer: int, check_finite: bool) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s experts as the provider's state dict (``w_in``, ``w_out``, and
        ``b_in``, ``b_out`` for experts with biases), in the provider's order."""
        from moekit.interop.hf import copy_pieces

        state = {}
        prefix = f"blocks.{layer}.ffn.experts."
        for name in self.expert_shapes:
            if not name.startswith(prefix):
                continue
            part = name.removeprefix(prefix)
            state[part] = torch.empty(self.expert_shapes[name], dtype=self.dtype)
            copy_pieces(state[part], self.plan[name], self.ckpt, check_finite)
        return state

    def materialize_rest(self, device: torch.device, check_finite: bool) -> MoETransformer:
        raise NotImplementedError

    def _build_meta(self, cfg) -> None:
        """The model on the meta device (free), and its expert tensors' shapes (read now: the
        meta experts leave the model before anything is allocated)."""
        with on_meta():
            self.meta = MoETransformer(cfg)
        self.expert_shapes = {n: tuple(t.shape) for n, t in self.meta.state_dict().items() if _EXPERTS.fullmatch(n)}


class _HFSource(_Source):
    def __init__(self, folder: Path, dtype: torch.dtype | None):
        from moekit.errors import ModelFolderError
        from moekit.interop.checkpoint import DTYPES
        from moekit.interop.hf import _plan_load, _shapes, read_hf_config
        from moekit.interop.registry import family_for

        self.hf = read_hf_config(folder)
        family = family_for(self.hf)
        if self.hf.get("quantization_config"):
            method = self.hf["quantization_config"].get("quant_method", "?")
            raise ModelFolderError(f"{folder}: quantized checkpoints ({method}) are not supported; dequantize to bf16 first")
        self.cfg = family.to_config(self.hf)
        self._build_meta(self.cfg)
        self.ckpt = Checkpoint(folder, pread=True)
        self.plan = _plan_load(_shapes(self.meta), self.cfg, family, self.hf, self.ckpt)
        embed = self.ckpt.entries[self.plan["embed.weight"][0].hf]  # as the checkpoint spells it
        self.dtype = self.rest_dtype = dtype or DTYPES[embed.dtype]

    def materialize_rest(self, device, check_finite):
        from moekit.interop.hf import _copy, _materialize

        model = _materialize(self.meta, self.dtype, device)
        _copy(model, _rest(self.plan), self.ckpt, check_finite)
        model.hf_config = self.hf
        return model


class _RunSource(_Source):
    """A moekit run folder's checkpoint: moekit's own names, fp32 model cast to ``dtype`` after
    loading (as ``load_run`` then ``.to(dtype)`` does, routers included)."""

    def __init__(self, checkpoint: Path, model_cfg, dtype: torch.dtype | None):
        from moekit.training.checkpoint import check_shapes

        self._build_meta(model_cfg)
        self.ckpt = Checkpoint(checkpoint, pread=True)
        want = {n: tuple(t.shape) for n, t in self.meta.state_dict().items()}
        have = {n: e.shape for n, e in self.ckpt.entries.items()}
        tied = model_cfg.tie_embeddings
        check_shapes(checkpoint, want, have, absent_ok=lambda n: tied and n == "lm_head.weight")
        self.plan = {n: [Piece(n)] for n in want if n in have}
        self.cast = dtype
        self.dtype = self.rest_dtype = dtype or torch.float32

    def materialize_rest(self, device, check_finite):
        from moekit.interop.hf import _copy, _materialize

        model = _materialize(self.meta, torch.float32, torch.device("cpu"))
        _copy(model, _rest(self.plan), self.ckpt, check_finite)
        if self.cast is not None:
            model = model.to(self.cast)
        return model.to(device)


class _QuantizedSource(_Source):
    """A ``moekit quantize`` folder: expert twins built one layer at a time from their stored
    codes (``quant.checkpoint``), the rest as ``load_quantized`` builds it."""

    def __init__(self, folder: Path, dtype: torch.dtype | None, reference: bool):
        from moekit.fileio import read_json_object
        from moekit.interop.checkpoint import DTYPES, SINGLE
        from moekit.quant.checkpoint import _plan, check_complete, model_config, split_config

        self.data, qcfg = split_config(read_json_object(folder / "config.json"))
        if reference:
            qcfg = QuantConfig(**{**qcfg.to_dict(), "reference": True})
        qcfg.check_supported()
        self.quantization = qcfg
        check_complete(folder / SINGLE)
        self._build_meta(model_config(self.data))
        self.ckpt = Checkpoint(folder, pread=True)
        self.qplan = _plan(self.meta, qcfg, self.ckpt)
        self.plan = {n: [Piece(n)] for n in self.qplan.floats}  # float experts when the scope left them out
        self.cast = dtype
        first = f"blocks.{next(iter(moe_blocks(self.meta)))}.ffn.experts"
        stored = self.ckpt.entries[f"{first}.w_in.scale" if first in self.qplan.twins else f"{first}.w_in"]
        self.dtype = dtype or DTYPES[stored.dtype]  # the scales' (or float experts') dtype, which the template copies
        self.rest_dtype = dtype or DTYPES[self.ckpt.entries["embed.weight"].dtype]

    def expert_state(self, layer, check_finite):
        from moekit.quant.checkpoint import _build_twin, _cast_floats

        name = f"blocks.{layer}.ffn.experts"
        if name not in self.qplan.twins:
            return super().expert_state(layer, check_finite)
        twin = _build_twin(name, *self.qplan.twins[name], self.quantization, self.ckpt)
        if self.cast is not None:
            _cast_floats(twin, self.cast)
        return dict(twin.state_dict())

    def materialize_rest(self, device, check_finite):
        from moekit.quant.checkpoint import _build_twin, _cast_floats, _materialize_float, _set

        model, rest_plan = self.meta, copy.copy(self.qplan)
        rest_plan.floats = {n: s for n, s in self.qplan.floats.items() if not _EXPERTS.fullmatch(n)}
        rest = [n for n, (kind, *_) in self.qplan.twins.items() if kind != "experts"]
        _materialize_float(model, rest_plan, self.ckpt)
        for name in rest:
            _set(model, name, _build_twin(name, *self.qplan.twins[name], self.quantization, self.ckpt))
        if self.cast is not None:
            _cast_floats(model, self.cast)
        if "architectures" in self.data:
            model.hf_config = self.data
        return model


def _rest(plan: dict[str, list[Piece]]) -> dict[str, list[Piece]]:
    return {n: p for n, p in plan.items() if not _EXPERTS.fullmatch(n)}


# -- the load -----------------------------------------------------------------------------------


def load_offloaded(folder: str | Path, kind: str, ocfg: OffloadConfig, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None, *, checkpoint: str | int = "last",
                   check_memory: bool = True, check_finite: bool = True, quantize=None,
                   reference: bool = False) -> MoETransformer | None:
    """The model of ``folder`` (``kind`` as ``inference.loading.folder_kind`` says: "hf", "run"
    or "quantized") with its experts streamed into the store of ``ocfg`` (module docstring);
    eval mode, runtime at ``model.offload``. ``quantize`` (8, 4 or a QuantConfig) quantizes at
    load: the experts layer by layer as they are written, the rest of the scope after.
    None (after a note on stderr) for a LoRA run or a sharded checkpoint, which the caller
    loads whole and then offloads (``inference.loading.load_for_inference`` does)."""
    folder = Path(folder)
    qcfg = QuantConfig(bits=quantize, reference=reference) if isinstance(quantize, int) else quantize
    if qcfg is not None:
        qcfg.check_supported()
    device = torch.device(device or "cpu")
    source = _open(folder, kind, dtype, checkpoint, reference)
    if source is None:  # a LoRA run or a sharded checkpoint: the whole load, then offload
        return None
    with source.ckpt:
        qcfg = _effective_quant(source, qcfg, device)
        templates = _templates(source, qcfg)  # the meta experts leave the meta model: nothing allocates them
        check_templates(templates)
        ocfg = resolve_budget(ocfg, source.meta.cfg, resident_bytes(source.meta, source.rest_dtype), source.rest_dtype)
        layouts = {i: ExpertLayout.of(dict(t.state_dict())) for i, t in templates.items()}
        slots_per_layer(ocfg, max(l.slot_bytes for l in layouts.values()), len(layouts),
                        max(t.num_experts for t in templates.values()))  # a budget too small fails before any work
        _check_room(source, layouts, ocfg, device, check_memory, str(folder))
        store, tmp = _write_store(source, templates, layouts, ocfg, qcfg, check_finite)
        try:
            model = source.materialize_rest(device, check_finite)
            rt = attach(model, ocfg, store, tmp, templates)
        except BaseException:
            store.close()
            if tmp is not None:
                tmp.cleanup()
            raise
    try:
        _quantize_rest(model, qcfg, source)
    except BaseException:
        rt.close()
        raise
    return model.eval()


def _open(folder: Path, kind: str, dtype, checkpoint, reference: bool) -> _Source | None:
    if kind == "hf":  # folder_kind says "hf" for a `moekit quantize` folder written from an HF model too
        from moekit.interop.hf import read_hf_config

        if "quantization" not in read_hf_config(folder):
            return _HFSource(folder, dtype)
        kind = "quantized"
    if kind == "quantized":
        return _QuantizedSource(folder, dtype, reference)
    from moekit.training.checkpoint import find_checkpoint, is_sharded, verify_checkpoint
    from moekit.training.run import read_run_configs

    train_cfg, model_cfg = read_run_configs(folder)
    path = find_checkpoint(folder, checkpoint)
    if train_cfg.trainable == "lora" or is_sharded(verify_checkpoint(path)):
        why = "a LoRA run (its adapters are merged into the experts)" if train_cfg.trainable == "lora" \
            else "a sharded checkpoint"
        print(f"moekit: {folder} is {why}: its experts cannot be streamed to the store, so the whole model "
              "is loaded first, then offloaded", file=sys.stderr)
        return None
    return _RunSource(path, model_cfg, dtype)


def _effective_quant(source: _Source, qcfg: QuantConfig | None, device: torch.device) -> QuantConfig | None:
    """What the experts become: the folder's own quantization, or ``--quantize``'s."""
    have = source.quantization
    if have is not None:
        if qcfg is not None and not ((have.bits, have.group_size) == (qcfg.bits, qcfg.group_size)
                                     or have.bits == qcfg.bits == 8):
            raise ConfigError(f"the model is already quantized (int{have.bits}); quantize its float original to "
                              f"int{qcfg.bits} instead")
        qcfg = have
    if qcfg is not None and device.type != "cpu":
        raise ConfigError(f"quantized models run on CPU in this version; the model is on {device}")
    return qcfg


def _templates(source: _Source, qcfg: QuantConfig | None) -> dict[int, nn.Module]:
    """Layer -> a meta-device provider of the kind the store will hold (only its metadata is
    read: num_experts, widths, activation, dtype, int4 layout)."""
    out = {}
    for i, block in moe_blocks(source.meta).items():
        experts = block.ffn.experts.to(source.dtype)  # still meta
        if qcfg is not None and "experts" in qcfg.scope:
            experts = QuantizedExperts.from_float(experts, qcfg.bits, qcfg.group_size, qcfg.kernel)
            if source.quantization is not None and source.dtype != torch.float32:
                from moekit.quant.checkpoint import _cast_floats

                _cast_floats(experts, source.dtype)
        out[i] = experts
        block.ffn.experts = nn.Module()  # a placeholder until ``attach``: holds nothing
    return out


def _write_store(source: _Source, templates: dict, layouts: dict[int, ExpertLayout], ocfg: OffloadConfig,
                 qcfg: QuantConfig | None, check_finite: bool):
    """Each MoE layer's experts from the checkpoint into the store, one layer in memory at a time."""
    counts = {i: t.num_experts for i, t in templates.items()}
    if ocfg.reuse_store:  # the store already holds them: checked against the layouts, nothing read
        store = DiskStore(ocfg.store_dir)
        check_matches(store, {i: dict(t.state_dict()) for i, t in templates.items()})
        return store, None
    tmp = folder = None
    if ocfg.store == "disk":
        if ocfg.store_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="moekit-experts-")
        folder = Path(ocfg.store_dir or tmp.name)
    kept = {}
    try:
        for n, i in enumerate(layouts):
            state = source.expert_state(i, check_finite)
            if qcfg is not None and "experts" in qcfg.scope and source.quantization is None:
                state = _quantize_layer(state, templates[i], qcfg)
            if ExpertLayout.of(state) != layouts[i]:  # internal invariant: what attach will read
                raise AssertionError(f"layer {i}'s experts do not have the planned layout")
            if folder is None:
                kept[i] = state
            else:
                write_layer(folder, i, state)
            del state
            _progress(n + 1, len(layouts))
        if folder is None:
            return RamStore(kept), None
        write_manifest(folder, layouts, counts)
        return DiskStore(folder), tmp
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise


def _quantize_layer(state: dict[str, torch.Tensor], template: QuantizedExperts, qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    """One layer's float experts -> the state of their ``QuantizedExperts`` twin (as ``from_float``:
    the biases, if any, stay float; the activation and its arguments are the template's)."""
    w_in = quantize_weight(state.pop("w_in"), qcfg.bits, qcfg.group_size, qcfg.kernel)
    w_out = quantize_weight(state.pop("w_out"), qcfg.bits, qcfg.group_size, qcfg.kernel)
    twin = QuantizedExperts(w_in, w_out, template.activation, template.act_args, state.pop("b_in", None),
                            state.pop("b_out", None))
    return dict(twin.state_dict())


def _quantize_rest(model: MoETransformer, qcfg: QuantConfig | None, source: _Source) -> None:
    """--quantize's scope beyond the experts (shared, attention, dense), as ``quantize_at_load``."""
    if qcfg is None or source.quantization is not None:
        model.quantization = source.quantization
        return
    others = tuple(s for s in qcfg.scope if s != "experts")
    if others:
        cov = quantize_model(model, dataclasses.replace(qcfg, scope=others))
        if cov.float_in_scope:
            raise ConfigError(f"{len(cov.float_in_scope)} matrix(es) in scope {','.join(others)} stayed floating "
                              f"point (first: {cov.float_in_scope[0]})")
    model.quantization = qcfg


def _check_room(source: _Source, layouts: dict, ocfg: OffloadConfig, device: torch.device, check: bool,
                what: str) -> None:
    """The non-expert weights, one layer's experts while it is written and the cache must fit
    (``check_fits``'s rule for the whole model, here for what is resident)."""
    from moekit.memory import HEADROOM, InsufficientMemoryError, available_bytes

    if not check:
        return
    avail = available_bytes(str(device))
    if avail is None:
        return
    layer = max(l.expert_bytes * source.meta.cfg.moe.num_experts for l in layouts.values())
    need = resident_bytes(source.meta, source.rest_dtype) + layer + ocfg.budget_bytes
    if need * HEADROOM > avail:
        raise InsufficientMemoryError(
            f"{what} with offloaded experts needs at least {need / 1e9:.2f} GB (non-expert weights, one layer's "
            f"experts while loading, and the expert cache) but only {avail / 1e9:.2f} GB is available; "
            "a smaller --expert-cache-gb may fit (--force skips this check)")


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rmoekit: experts to the store: layer {done}/{total}", end="\n" if done == total else "",
              file=sys.stderr, flush=True)


__all__ = ["load_offloaded", "NOT_STREAMED"]
