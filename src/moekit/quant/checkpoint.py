"""Quantized model folders: what ``moekit quantize`` writes and ``from_pretrained`` reads.

A folder holds ``config.json`` (the model's Hugging Face config, or moekit's own config for a
model trained here, plus a ``quantization`` entry: format, bits, group size, scope) and one
``model.safetensors`` under moekit's module paths: for each quantized weight its portable
tensors (``<path>.qweight`` int8, or uint8 with two int4 codes per byte, ``<path>.scale``,
``<path>.zero`` for int4; see ``weights.py``), every other tensor in float as the model held
it. transformers cannot load such a folder (no architecture of it knows the format), so the
names are moekit's, not the published ones.

Loading checks every name, shape and dtype against the config before reading any tensor
data (a truncated or mismatched file is an error naming the tensor); it then builds the float
part on the meta device and materializes it, and builds each quantized twin straight from its
stored tensors, so no float copy of the quantized weights is ever made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from moekit.config import ModelConfig
from moekit.errors import ModelFolderError, UsageError
from moekit.fileio import read_json_object
from moekit.interop.checkpoint import SINGLE, Checkpoint, remove_stale, write_json, write_safetensors
from moekit.meta import materialize, on_meta
from moekit.model import MoETransformer
from moekit.quant.convert import QuantConfig, quantized_weights, targets
from moekit.quant.modules import QuantizedExperts, QuantizedLinear, QuantizedMLP
from moekit.quant.weights import weight_class

FORMAT = "moekit-weight-only"  # the ``quantization.format`` this module writes and reads
ROUTER = ".ffn.router"  # routers stay fp32 whatever dtype is asked for (as in from_pretrained)
_FLOAT_BIASES = (".bias", ".b_in", ".b_out")  # twins' tensors stored in float, read by ``_build_twin``
_SAFETENSORS_DTYPES = {"int8": {"I8"}, "uint8": {"U8"}, "float": {"F32", "BF16", "F16"},
                       "int64": {"I64"}, "int32": {"I32"}, "bool": {"BOOL"}}  # integer buffers: V4's hash table


class QuantizedCheckpointError(ModelFolderError):
    """A quantized folder that does not match its config (names the tensor)."""


def is_quantized_config(data: dict) -> bool:
    return isinstance(data.get("quantization"), dict)


def split_config(data: dict) -> tuple[dict, QuantConfig]:
    """A quantized folder's config.json -> (the model's own config, QuantConfig)."""
    data = dict(data)
    entry = dict(data.pop("quantization"))
    if entry.pop("format", None) != FORMAT:
        raise QuantizedCheckpointError(f"unknown quantization format {entry.get('format')!r}; moekit reads {FORMAT!r}")
    return data, QuantConfig.from_dict(entry)


def model_config(data: dict) -> ModelConfig:
    from moekit.interop import config_from_hf, is_hf_config

    return config_from_hf(data) if is_hf_config(data) else ModelConfig.from_dict(data)


# --- writing ---------------------------------------------------------------------------------


def save_quantized(model: MoETransformer, folder: str | Path) -> Path:
    """Write a model that ``quantize_model`` swapped into a quantized folder (atomically per file)."""
    qcfg: QuantConfig | None = getattr(model, "quantization", None)
    if qcfg is None:
        raise ValueError("this model is not quantized (run moekit.quant.quantize_model first)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / SINGLE, export_tensors(model))
    base = dict(getattr(model, "hf_config", None) or model.cfg.to_dict())
    base.pop("quantization_config", None)
    base["quantization"] = {"format": FORMAT, **qcfg.to_dict()}
    remove_stale(folder, {SINGLE})
    write_json(folder / "config.json", base)  # last: a folder without it is not a model
    return folder


def export_tensors(model: MoETransformer) -> dict[str, torch.Tensor]:
    q = quantized_weights(model)
    out = {f"{p}.{k}": t.contiguous() for p, w in q.items() for k, t in w.export().items()}
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] in q or (model.cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        out[name] = t.detach().contiguous()
    return out


# --- reading ---------------------------------------------------------------------------------


def load_quantized(path: str | Path, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None, reference: bool = False) -> MoETransformer:
    """Load a folder written by ``save_quantized`` (eval mode, on CPU: the int4 kernel is CPU's).
    ``reference``: int4 through dequantize-then-matmul instead of torch's kernel (a torch that
    lacks it); the stored codes are portable, so any int4 folder loads either way."""
    folder = Path(path)
    data, qcfg = split_config(read_json_object(folder / "config.json"))
    if reference:
        qcfg = QuantConfig(**{**qcfg.to_dict(), "reference": True})
    if device is not None and torch.device(device).type != "cpu":
        raise UsageError(f"quantized models run on CPU in this version; got device {device}")
    qcfg.check_supported()
    cfg = model_config(data)
    check_complete(folder / SINGLE)
    with on_meta():
        model = MoETransformer(cfg)
    try:
        with Checkpoint(folder) as ckpt:
            plan = _plan(model, qcfg, ckpt)
            _materialize_float(model, plan, ckpt)
            for name, twin in plan.twins.items():
                _set(model, name, _build_twin(name, *twin, qcfg, ckpt))
    except SafetensorError as e:
        raise QuantizedCheckpointError(f"cannot read {folder / SINGLE}: {e}") from e
    if dtype is not None:
        _cast_floats(model, dtype)
    if "architectures" in data:
        model.hf_config = data
    model.quantization = qcfg
    return model.eval()


def check_complete(path: Path) -> None:
    """A truncated safetensors file is an error naming the first tensor whose bytes are missing
    (safetensors itself only says the buffer is incomplete). Format: an 8-byte little-endian
    header length, the JSON header (name -> dtype, shape, data_offsets), then the data."""
    if not path.is_file():
        raise QuantizedCheckpointError(f"no {SINGLE} in {path.parent}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise QuantizedCheckpointError(f"{path} is truncated or not a safetensors file (its header is unreadable)")
    tensors = sorted((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    for end, name in tensors:
        if 8 + n + end > size:
            raise QuantizedCheckpointError(f"{path} is truncated: tensor {name!r} needs bytes up to {8 + n + end:,}, "
                                           f"the file has {size:,}")


class _Plan:
    def __init__(self):
        # module path -> (kind, quantized weight path -> float shape, activation, act_args)
        self.twins: dict[str, tuple[str, dict[str, tuple[int, ...]], str | None, tuple]] = {}
        self.floats: dict[str, tuple[int, ...]] = {}  # float tensor -> shape


def _float_weights(module: nn.Module, kind: str) -> dict[str, tuple[int, ...]]:
    """Quantized weight paths (relative to the module) -> the float shape they stand for."""
    if kind == "experts":
        return {"w_in": tuple(module.w_in.shape), "w_out": tuple(module.w_out.shape)}
    if kind == "attention":
        return {"weight_q": tuple(module.weight.shape)}
    return {"w_in.weight_q": tuple(module.w_in.weight.shape), "w_out.weight_q": tuple(module.w_out.weight.shape)}


def _plan(model: MoETransformer, qcfg: QuantConfig, ckpt: Checkpoint) -> _Plan:
    """Every expected tensor's name, shape and dtype, checked against the file's header."""
    plan, expected = _Plan(), {}
    wcls = weight_class(qcfg.bits)
    for name, kind in targets(model, qcfg.scope):
        module = model.get_submodule(name)
        weights = _float_weights(module, kind)
        plan.twins[name] = (kind, weights, getattr(module, "activation", None), getattr(module, "act_args", ()))
        for wpath, shape in weights.items():
            for k, (s, dt) in wcls.export_shapes(shape, qcfg.group_size).items():
                expected[f"{name}.{wpath}.{k}"] = (s, dt)
    owned = tuple(f"{n}." for n in plan.twins)
    for name, t in model.state_dict().items():
        # QuantizedLinear's float bias, QuantizedExperts' (GPT-OSS), under the float model's names
        keep_bias = name.endswith(_FLOAT_BIASES) and name.rpartition(".")[0] in plan.twins
        if (name.startswith(owned) and not keep_bias) or (model.cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        plan.floats[name] = tuple(t.shape)
        expected[name] = (tuple(t.shape), "float" if t.is_floating_point() else str(t.dtype).removeprefix("torch."))
    for name, (shape, kind) in expected.items():
        entry = ckpt.entries.get(name)
        if entry is None:
            raise QuantizedCheckpointError(f"tensor {name!r} is missing from {ckpt.folder / SINGLE}")
        if entry.shape != shape or entry.dtype not in _SAFETENSORS_DTYPES[kind]:
            raise QuantizedCheckpointError(
                f"tensor {name!r} in {ckpt.folder / entry.file} is {entry.dtype} {list(entry.shape)}; the quantization "
                f"config (int{qcfg.bits}, group {qcfg.group_size}) implies {kind} {list(shape)}")
    if extra := sorted(set(ckpt.entries) - set(expected)):
        raise QuantizedCheckpointError(f"tensor {extra[0]!r} in {ckpt.folder} maps to nothing in this model"
                                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return plan


def _materialize_float(model: MoETransformer, plan: _Plan, ckpt: Checkpoint) -> None:
    """Allocate everything but the quantized modules and fill it from the checkpoint."""
    for name in plan.twins:  # nothing of the float originals is allocated
        _set(model, name, nn.Module())
    materialize(model, "cpu")  # buffers zeroed: persistent ones are loaded next, load counters start at zero
    state = {name: ckpt.get(name) for name in plan.floats if name.rpartition(".")[0] not in plan.twins}
    model.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight


def _build_twin(name: str, kind: str, weights: dict, activation: str | None, act_args: tuple, qcfg: QuantConfig,
                ckpt: Checkpoint) -> nn.Module:
    wcls = weight_class(qcfg.bits)

    def load(wpath: str):
        prefix = f"{name}.{wpath}."
        shapes = wcls.export_shapes(weights[wpath], qcfg.group_size)
        return wcls.from_export({k: ckpt.get(prefix + k) for k in shapes}, qcfg.group_size, qcfg.kernel)

    if kind == "experts":  # biases: present in the file exactly when the model has them (``_plan`` checked)
        b_in, b_out = (ckpt.get(f"{name}.{b}") if f"{name}.{b}" in ckpt.entries else None for b in ("b_in", "b_out"))
        return QuantizedExperts(load("w_in"), load("w_out"), activation, act_args, b_in, b_out)
    if kind == "attention":
        bias = ckpt.get(f"{name}.bias") if f"{name}.bias" in ckpt.entries else None
        return QuantizedLinear(load("weight_q"), bias)
    return QuantizedMLP(QuantizedLinear(load("w_in.weight_q"), None), QuantizedLinear(load("w_out.weight_q"), None),
                        activation, act_args)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    for name, module in model.named_modules():
        if name.endswith(ROUTER) or ROUTER + "." in name:
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.is_floating_point():
                t.data = t.data.to(dtype)


__all__ = ["save_quantized", "load_quantized", "export_tensors", "is_quantized_config", "split_config",
           "QuantizedCheckpointError", "FORMAT"]
