"""One call from a folder to everything generation needs: model, tokenizer, generation defaults.

MODEL is either a moekit run folder (``train_config.json``: the model comes from its last
checkpoint, the tokenizer is the run's own), a Hugging Face model folder (``config.json``
with ``model_type``: weights through ``moekit.from_pretrained``, tokenizer from
``tokenizer.json``), or a folder that ``moekit quantize`` wrote from either (``config.json``
with a ``quantization`` entry; from a run, the config is moekit's own and so is the tokenizer). The tokenizer is read first, so a folder without one fails in a moment
with a line naming the missing file, not after minutes of loading weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.errors import UsageError
from moekit.inference.generation_config import GenerationDefaults, load_generation_defaults
from moekit.inference.tokenization import TextTokenizer, load_tokenizer

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` or a name ("bf16", "float32", ...); None keeps the checkpoint's."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def folder_kind(folder: Path) -> str:
    """"run" (moekit train's folder), "hf" (a Hugging Face model folder, or a quantized folder
    written from one) or "quantized" (``moekit quantize``'s folder from a run); UsageError
    otherwise."""
    from moekit.fileio import read_json_object
    from moekit.interop.registry import is_hf_config
    from moekit.training.run import is_run_dir

    if not folder.exists():
        raise UsageError(f"no such model folder: {folder}")
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file; MODEL must be a moekit run folder or a Hugging Face model folder")
    if is_run_dir(folder):
        return "run"
    config = folder / "config.json"
    if config.is_file():
        try:
            data = read_json_object(config)
            if is_hf_config(data):
                return "hf"
        except ValueError as e:
            raise UsageError(str(e)) from None
        if isinstance(data.get("quantization"), dict):
            return "quantized"
    raise UsageError(f"{folder} is neither a moekit run folder (no train_config.json) nor a Hugging Face "
                     "model folder (no config.json with a model_type)")


def load_for_inference(path: str | Path, dtype: torch.dtype | str | None = None,
                       device: str | torch.device | None = None,
                       checkpoint: str | int = "last", *, check_memory: bool = True,
                       check_finite: bool = True, quantize=None, reference: bool = False,
                       offload=None) -> tuple[torch.nn.Module, TextTokenizer, GenerationDefaults]:
    """(model in eval mode, tokenizer, generation defaults) of a run folder, HF folder or
    quantized folder. ``checkpoint`` ("last", "best" or a step) applies to run folders only.
    ``check_memory`` refuses a model bigger than the memory available; ``check_finite`` refuses
    NaN/inf weights. ``quantize`` (8, 4 or a ``moekit.quant.QuantConfig``) quantizes at load;
    ``reference`` runs int4 without torch's kernel (``moekit.from_pretrained``). ``offload``
    (a ``moekit.offload.OffloadConfig``) streams the routed experts to its store one layer at
    a time, never holding the whole model (``moekit.offload.stream``)."""
    folder = Path(path)
    kind = folder_kind(folder)
    dtype = parse_dtype(dtype)
    tokenizer = load_tokenizer(folder)
    try:
        model = None
        if offload is not None:
            from moekit.offload.stream import load_offloaded

            model = load_offloaded(folder, kind, offload, dtype, device, checkpoint=checkpoint,
                                   check_memory=check_memory, check_finite=check_finite, quantize=quantize,
                                   reference=reference)
        if model is None:
            model = _load_whole(folder, kind, dtype, device, checkpoint, check_memory, check_finite, quantize, reference)
            if offload is not None:  # a LoRA run or a sharded checkpoint (load_offloaded said so): offload after
                from moekit.offload.runtime import offload_model

                offload_model(model, offload)
    except ValueError as e:  # interop reports unsupported configs and bad files as ValueError
        raise UsageError(" ".join(str(e).split())) from None
    return model.eval(), tokenizer, load_generation_defaults(folder, tokenizer)


def _load_whole(folder: Path, kind: str, dtype, device, checkpoint, check_memory: bool, check_finite: bool,
                quantize, reference: bool) -> torch.nn.Module:
    if kind == "run":
        from moekit.training.run import load_run

        model = load_run(folder, checkpoint, device=device or "cpu", check_memory=check_memory,
                         check_finite=check_finite).model
        if dtype is not None:
            model = model.to(dtype)
        if quantize is not None:
            from moekit.quant.convert import QuantConfig, quantize_at_load

            quantize_at_load(model, QuantConfig(bits=quantize, reference=reference)
                             if isinstance(quantize, int) else quantize)
        return model
    from moekit.interop import from_pretrained

    return from_pretrained(folder, dtype=dtype, device=device, check_memory=check_memory,
                           check_finite=check_finite, quantize=quantize, reference=reference)


__all__ = ["load_for_inference", "folder_kind", "parse_dtype", "DTYPE_NAMES"]
