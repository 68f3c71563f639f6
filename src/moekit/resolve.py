"""What a user names as a model -> (label, ModelConfig): a preset name, a moekit config JSON,
a Hugging Face config.json, or a folder holding either. Used by inspect, demo and train."""

from __future__ import annotations

import sys
from pathlib import Path

from moekit.config import ModelConfig
from moekit.errors import UsageError
from moekit.fileio import read_json_object


def resolve_config(target: str) -> tuple[str, ModelConfig]:
    """A preset name, a moekit config JSON, a Hugging Face config.json, or a folder holding
    either -> (label, config). Bad names and files raise a UsageError."""
    from moekit.presets import PRESETS, get_preset

    if target in PRESETS:
        return target, get_preset(target)
    from moekit.interop import config_from_hf, is_hf_config  # imports torch (DeepSeek's row permutations)

    path = Path(target)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        if path.suffix or "/" in target:
            raise UsageError(f"no such file: {path}")
        from moekit.audit import PAPER_MODELS

        try:
            get_preset(target)
        except ValueError as e:  # "unknown preset ...; known presets: ...", plus the paper models
            raise UsageError(f"{e}; paper models (inspect only): {', '.join(PAPER_MODELS)}") from None
    data = read_json_object(path)
    data.pop("quantization", None)  # a `moekit quantize` folder: the model's own config plus this entry
    if is_hf_config(data):  # "architectures"/"model_type": a Hugging Face model's config.json
        cfg = config_from_hf(data)
        mtp = data.get("num_nextn_predict_layers") or 0
        if mtp:  # on stderr: `inspect --json` output stays pure JSON
            print(f"note: {path}: {mtp} multi-token-prediction layer(s) not counted; they are not part "
                  "of the language model, and from_pretrained skips them", file=sys.stderr)
        return str(path), cfg
    return str(path), ModelConfig.from_dict(data)


__all__ = ["resolve_config"]
