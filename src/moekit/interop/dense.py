"""Dense Llama-lineage families: Llama, Mistral and Qwen2 (the starting points of upcycling).

Each reads into a ``ModelConfig`` with ``moe=None``; the defaults are those of transformers'
config classes, used where a published config.json leaves a key out.
"""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.interop.family import Family, Fields, HFConfig, Representable, llama_fields, llama_to_hf

_COMMON = dict(rope_theta=10000.0, rms_norm_eps=1e-6)


def llama_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, {**_COMMON, "max_position_embeddings": 2048}, "LlamaForCausalLM")
    f.reject("attention_bias", False, "moekit's output projection has no bias")
    f.reject("mlp_bias", False, "moekit's FFNs have no bias")
    return ModelConfig(**llama_fields(f, "LlamaForCausalLM"))


def llama_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, "LlamaForCausalLM")
    r.attention(sliding=False)
    r.dense()
    r.check()
    return {**llama_to_hf(cfg, "LlamaForCausalLM", "llama"), "attention_bias": False, "mlp_bias": False}


def mistral_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, {**_COMMON, "max_position_embeddings": 131072, "num_key_value_heads": 8}, "MistralForCausalLM")
    window = hf.get("sliding_window", 4096)  # absent: MistralConfig's default; null: full attention
    return ModelConfig(**llama_fields(f, "MistralForCausalLM"), sliding_window=window)


def mistral_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, "MistralForCausalLM")
    r.attention()
    r.dense()
    r.check()
    return {**llama_to_hf(cfg, "MistralForCausalLM", "mistral"), "sliding_window": cfg.sliding_window}


def qwen2_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, {**_COMMON, "max_position_embeddings": 32768}, "Qwen2ForCausalLM")
    f.reject("use_sliding_window", False, "Qwen2's per-layer sliding windows are not implemented")
    return ModelConfig(**llama_fields(f, "Qwen2ForCausalLM"), qkv_bias=True)  # Qwen2 always has QKV bias


def qwen2_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, "Qwen2ForCausalLM")
    r.attention(qkv_bias=True, sliding=False)
    r.dense()
    r.check()
    return {**llama_to_hf(cfg, "Qwen2ForCausalLM", "qwen2"), "use_sliding_window": False}


LLAMA = Family(("LlamaForCausalLM",), "llama", llama_config, llama_hf)
MISTRAL = Family(("MistralForCausalLM",), "mistral", mistral_config, mistral_hf)
QWEN2 = Family(("Qwen2ForCausalLM",), "qwen2", qwen2_config, qwen2_hf)
