"""Hugging Face interop: load and export Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and the
dense Llama/Mistral/Qwen2 families with logits identical to transformers'.

Imported lazily (see ``moekit.lazy``): reading a config.json needs no torch."""

from moekit.lazy import lazy_exports

_EXPORTS = {
    "from_pretrained": "moekit.interop.hf",
    "save_pretrained": "moekit.interop.export",
    "config_from_hf": "moekit.interop.registry",
    "is_hf_config": "moekit.interop.registry",
    "supported_architectures": "moekit.interop.registry",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
