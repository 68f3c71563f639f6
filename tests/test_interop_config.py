"""config.json -> ModelConfig: keys a config leaves out read as transformers' config classes read them."""

import pytest

from moekit.interop import config_from_hf, supported_architectures

transformers = pytest.importorskip("transformers")

SIZES = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
         "num_attention_heads")


def default_config(arch: str) -> dict:
    """transformers' default config of ``arch``, every key written out."""
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return {**cls().to_dict(), "architectures": [arch]}


@pytest.mark.parametrize("arch", supported_architectures())
def test_omitted_keys_take_transformers_defaults(arch):
    full = default_config(arch)
    minimal = {k: v for k, v in full.items() if k in SIZES or k in ("architectures", "model_type")}
    assert config_from_hf(minimal) == config_from_hf(full)


def test_null_kv_heads_means_one_per_query_head():
    cfg = default_config("MixtralForCausalLM")
    assert config_from_hf(cfg).kv_heads == 8
    assert config_from_hf({**cfg, "num_key_value_heads": None}).kv_heads == cfg["num_attention_heads"]


def test_mistral_null_window_is_full_attention():
    cfg = default_config("MistralForCausalLM")
    assert config_from_hf(cfg).sliding_window == 4096
    assert config_from_hf({**cfg, "sliding_window": None}).sliding_window is None


def test_unsupported_values_are_refused_by_name():
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        config_from_hf({**default_config("LlamaForCausalLM"), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="scoring_func='softmax' is not supported"):
        config_from_hf({**default_config("DeepseekV3ForCausalLM"), "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="rope scaling type 'longrope' is not supported"):
        config_from_hf({**default_config("Qwen2ForCausalLM"), "rope_parameters": {"rope_type": "longrope",
                                                                                  "rope_theta": 1e4, "factor": 2.0}})
