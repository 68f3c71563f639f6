"""moekit: build, inspect, train and analyze Mixture-of-Experts language models in PyTorch.

The names below are imported on first use (see ``moekit.lazy``), so the command line's help
and ``moekit presets`` start without torch.
"""

from moekit.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "MoEConfig": "moekit.config",
    "ModelConfig": "moekit.config",
    "CompressionConfig": "moekit.config",
    "MoELayer": "moekit.layers.moe",
    "RoutingStats": "moekit.layers.moe",
    "MoETransformer": "moekit.model",
    "ModelOutput": "moekit.model",
    "LossParts": "moekit.model",
    "lm_loss": "moekit.model",
    "count_params": "moekit.accounting",
    "ParamCount": "moekit.accounting",
    "get_preset": "moekit.presets",
    "preset_names": "moekit.presets",
    "from_pretrained": "moekit.interop",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
