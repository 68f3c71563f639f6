"""The supported Hugging Face architectures, looked up by the exact name in config.json."""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.errors import ConfigError
from moekit.interop.deepseek_v2 import DEEPSEEK_V2
from moekit.interop.deepseek_v3 import DEEPSEEK_V3
from moekit.interop.deepseek_v4 import DEEPSEEK_V4
from moekit.interop.dense import LLAMA, MISTRAL, QWEN2
from moekit.interop.family import Family, HFConfig, architecture_of
from moekit.interop.gpt_oss import GPT_OSS
from moekit.interop.llama4 import LLAMA4, LLAMA4_MULTIMODAL
from moekit.interop.mixtral import MIXTRAL
from moekit.interop.olmoe import OLMOE
from moekit.interop.qwen_moe import QWEN2_MOE_FAMILY, QWEN3_MOE_FAMILY

FAMILIES: tuple[Family, ...] = (
    MIXTRAL, QWEN2_MOE_FAMILY, QWEN3_MOE_FAMILY, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3, DEEPSEEK_V4, GPT_OSS, LLAMA4, LLAMA4_MULTIMODAL, LLAMA, MISTRAL, QWEN2,
)
BY_ARCHITECTURE: dict[str, Family] = {arch: fam for fam in FAMILIES for arch in fam.architectures}
BY_MODEL_TYPE: dict[str, Family] = {fam.model_type: fam for fam in FAMILIES}


def supported_architectures() -> list[str]:
    return list(BY_ARCHITECTURE)


# Architectures transformers has and moekit knows but cannot load exactly yet: refused with the reason.
NOT_IMPLEMENTED: dict[str, str] = {}


def family_for_architecture(name: str) -> Family:
    if name in NOT_IMPLEMENTED:
        raise ConfigError(f"architecture {name!r} is not supported: {NOT_IMPLEMENTED[name]}; "
                          f"supported: {', '.join(BY_ARCHITECTURE)}")
    if name not in BY_ARCHITECTURE:
        raise ConfigError(f"unsupported architecture {name!r}; supported: {', '.join(BY_ARCHITECTURE)}")
    return BY_ARCHITECTURE[name]


def family_for(hf: HFConfig) -> Family:
    """The family of a config.json: its first "architectures" entry, else its model_type."""
    if hf.get("architectures"):
        return family_for_architecture(architecture_of(hf))
    if hf.get("model_type") in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[hf["model_type"]]
    return family_for_architecture(str(hf.get("model_type")))


def config_from_hf(hf: HFConfig) -> ModelConfig:
    """A Hugging Face config.json dict -> ModelConfig (nothing is loaded; counts come from this)."""
    return family_for(hf).to_config(hf)


def is_hf_config(data: dict) -> bool:
    return "architectures" in data or "model_type" in data
