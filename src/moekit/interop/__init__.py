"""Hugging Face interop: load and export Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 and the
dense Llama/Mistral/Qwen2 families with logits identical to transformers'."""

from moekit.interop.hf import from_pretrained, save_pretrained
from moekit.interop.registry import config_from_hf, is_hf_config, supported_architectures

__all__ = ["from_pretrained", "save_pretrained", "config_from_hf", "is_hf_config", "supported_architectures"]
