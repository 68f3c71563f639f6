"""config.json -> ModelConfig: keys a config leaves out read as transformers' config classes read them."""

import json
import re

import pytest

from moekit.interop import config_from_hf, supported_architectures

transformers = pytest.importorskip("transformers")

SIZES = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
         "num_attention_heads")


CONFIG_CLASSES = {"Llama4ForCausalLM": "Llama4TextConfig", "Llama4ForConditionalGeneration": "Llama4Config"}


def default_config(arch: str) -> dict:
    """transformers' default config of ``arch``, every key written out."""
    name = CONFIG_CLASSES.get(arch, arch.replace("ForCausalLM", "Config"))
    cfg = {**getattr(transformers, name)().to_dict(), "architectures": [arch]}
    if cfg.get("num_experts_per_tok", 0) is None:  # DeepseekV2Config's default; its router needs a number
        cfg["num_experts_per_tok"] = 6
    return cfg


@pytest.mark.parametrize("arch", supported_architectures())
def test_omitted_keys_take_transformers_defaults(arch):
    full = default_config(arch)
    keep = lambda d: {k: v for k, v in d.items()  # noqa: E731
                      if k in SIZES or k in ("architectures", "model_type", "num_experts_per_tok")}
    minimal = keep(full)
    if "text_config" in full:  # Llama 4's multimodal config: the sizes live in its text_config
        minimal["text_config"] = keep(full["text_config"])
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


def test_deepseek_v2_routing_it_does_not_run_is_refused_by_name():
    cfg = default_config("DeepseekV2ForCausalLM")
    with pytest.raises(ValueError, match="topk_method='noaux_tc' is not supported; supported: greedy, group_limited"):
        config_from_hf({**cfg, "topk_method": "noaux_tc"})
    with pytest.raises(ValueError, match="norm_topk_prob=True is not supported"):
        config_from_hf({**cfg, "norm_topk_prob": True})
    grouped = config_from_hf({**cfg, "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}).moe
    assert (grouped.num_groups, grouped.topk_groups, grouped.group_score) == (8, 3, "max")


def test_llama4_reads_its_layer_pattern_and_refuses_what_it_cannot_run():
    cfg = default_config("Llama4ForCausalLM")
    read = config_from_hf({**cfg, "interleave_moe_layer_step": 2, "moe_layers": None})
    assert read.nope_layers == read.global_layers == tuple(range(3, 48, 4)) and read.attention_chunk == 8192
    assert read.moe_layer_ids == list(range(1, 48, 2)) and read.qk_norm == "l2"
    odd = config_from_hf({**cfg, "moe_layers": [0, 5]})
    assert odd.moe_layer_ids == [0, 5]
    with pytest.raises(ValueError, match="num_experts_per_tok=2 is not supported"):
        config_from_hf({**cfg, "num_experts_per_tok": 2})
    with pytest.raises(ValueError, match="layer_types must be 48 entries of chunked_attention, full_attention"):
        config_from_hf({**cfg, "layer_types": ["sliding_attention"] * 48})
    assert config_from_hf({**cfg, "attention_chunk_size": None}).attention_chunk is None


def test_gpt_oss_layer_types_it_cannot_run_are_refused():
    cfg = default_config("GptOssForCausalLM")
    read = config_from_hf(cfg)
    n = cfg["num_hidden_layers"]
    assert read.global_layers == tuple(range(1, n, 2)) and read.sliding_window == 128
    bad = {**cfg, "layer_types": ["chunked_attention"] * n}
    with pytest.raises(ValueError, match=f"layer_types must be {n} entries of sliding_attention, full_attention"):
        config_from_hf(bad)
    assert config_from_hf({**cfg, "layer_types": ["full_attention"] * n}).sliding_window is None


@pytest.mark.parametrize("key, value, needle", [
    ("hidden_size", "64", "hidden_size must be a number, got '64'"),
    ("rope_theta", "x", "rope_theta must be a number, got 'x'"),
    ("num_local_experts", [4], "num_local_experts must be a number, got [4]"),
    ("rms_norm_eps", True, "rms_norm_eps must be a number, got True"),
    ("tie_word_embeddings", "no", "tie_word_embeddings must be true or false, got 'no'"),
])
def test_a_wrong_kind_in_config_json_names_the_key(tmp_path, capsys, key, value, needle):
    from moekit.cli import main
    from moekit.errors import ConfigError
    from moekit.interop import config_from_hf

    hf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
          "vocab_size": 100, "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 128,
          key: value}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config_from_hf(hf)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
