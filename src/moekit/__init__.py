"""moekit: build, inspect, train and analyze Mixture-of-Experts language models in PyTorch."""

from moekit.accounting import ParamCount, count_params
from moekit.config import MoEConfig, ModelConfig
from moekit.interop import from_pretrained
from moekit.layers.moe import MoELayer, RoutingStats
from moekit.model import LossParts, ModelOutput, MoETransformer, lm_loss
from moekit.presets import get_preset, preset_names

__version__ = "0.1.0"

__all__ = [
    "MoEConfig",
    "ModelConfig",
    "MoELayer",
    "RoutingStats",
    "MoETransformer",
    "ModelOutput",
    "LossParts",
    "lm_loss",
    "count_params",
    "ParamCount",
    "get_preset",
    "preset_names",
    "from_pretrained",
]
