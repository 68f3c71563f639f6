"""Config validation: bad values fail early with a ValueError naming the field."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoEConfig, ModelConfig, MoELayer, get_preset
from moekit.config import ROUTERS
from moekit.data import DataConfig
from moekit.errors import ConfigError, UsageError
from moekit.training import TrainConfig


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(top_k=9), "top_k"),
        (dict(d_model=0), "d_model"),
        (dict(d_expert=-4), "d_expert"),
        (dict(num_experts=0), "num_experts"),
        (dict(router="hash"), "router"),
        (dict(activation="tanh"), "activation"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(router="sigmoid", num_groups=3), "num_groups"),
        (dict(router="sigmoid", num_groups=4, topk_groups=5), "topk_groups"),
        (dict(router="sigmoid", num_groups=4, topk_groups=1, top_k=3), "top_k"),
        (dict(topk_groups=2), "topk_groups"),
        (dict(d_shared=64), "d_shared"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(router_jitter=1.5), "router_jitter"),
        (dict(load_balance_coef=-0.1), "load_balance_coef"),
        (dict(router="expert_choice", bias_update_rate=0.001), "bias_update_rate"),
        (dict(top_k=2.0), "top_k"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    ],
)
def test_bad_moe_config_names_the_field(kw, field):
    base = dict(d_model=16, d_expert=32, num_experts=8)
    base.update(kw)
    with pytest.raises(ValueError, match=field):
        MoEConfig(**base)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(qk_norm="layer"), "qk_norm"),
        (dict(dense_layers=(7,)), "dense_layers"),
        (dict(moe=MoEConfig(d_model=64, d_expert=8, num_experts=4)), "moe.d_model"),
    ],
)
def test_bad_model_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig(**kw)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="tiny-moe.*mixtral-8x7b"):
        get_preset("tiny-mo")


def test_unknown_field_in_dict_is_named():
    with pytest.raises(ValueError, match="topk"):
        MoEConfig.from_dict(dict(d_model=8, d_expert=8, num_experts=2, topk=1))


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-fine", "tiny-dense", "qwen1.5-moe-a2.7b"])
def test_config_round_trips_through_json(preset):
    cfg = get_preset(preset)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


moe_kwargs = st.fixed_dictionaries(
    dict(
        d_model=st.integers(-2, 48),
        d_expert=st.integers(-2, 48),
        num_experts=st.integers(-1, 16),
        top_k=st.integers(-1, 17),
        router=st.sampled_from(ROUTERS + ("bogus",)),
        num_groups=st.integers(0, 8),
        topk_groups=st.integers(0, 8),
        capacity_factor=st.one_of(st.none(), st.floats(-1.0, 3.0, allow_nan=False)),
        num_shared_experts=st.integers(-1, 2),
        bias_update_rate=st.sampled_from([0.0, 1e-3]),
    )
)


@settings(max_examples=300, deadline=None)
@given(moe_kwargs)
def test_generated_configs_are_valid_or_name_a_field(kw):
    """Any generated config either builds a layer that runs, or fails with a ValueError naming
    one of its fields; never another exception, never an invalid config accepted."""
    try:
        cfg = MoEConfig(**kw)
    except ValueError as e:
        assert any(name in str(e) for name in list(kw) + ["d_shared"]), str(e)
        return
    assert 1 <= cfg.top_k <= cfg.num_experts
    assert cfg.num_experts % cfg.num_groups == 0
    assert cfg.capacity_factor is None or cfg.capacity_factor > 0
    if cfg.d_model * cfg.d_expert * cfg.num_experts <= 16 * 16 * 16:
        import torch

        layer = MoELayer(cfg)
        layer.reset_parameters(0.1, 0.1)
        y = layer(torch.randn(1, 5, cfg.d_model))
        assert y.shape == (1, 5, cfg.d_model) and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "cls, where",
    [
        (MoEConfig, "MoEConfig"), (ModelConfig, "ModelConfig"), (TrainConfig, "train"), (DataConfig, "data"),
    ],
)
def test_every_config_refuses_unknown_fields_with_one_check(cls, where):
    with pytest.raises(ConfigError, match=rf"unknown {where} field\(s\) \['bogus'\]; known: \["):
        cls.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match=f"{where} must be a mapping of fields, got list"):
        cls.from_dict([1, 2])


def test_config_errors_are_value_errors_for_library_callers_and_usage_errors_for_the_cli():
    with pytest.raises(ValueError) as e:
        MoEConfig(d_model=8, d_expert=8, num_experts=0)
    assert isinstance(e.value, UsageError) and isinstance(e.value, ConfigError)


@pytest.mark.parametrize("moe", [5, "x", [1]])
def test_moe_that_is_not_a_mapping_is_named(moe):
    with pytest.raises(ConfigError, match="moe must be a mapping of MoEConfig fields or null"):
        ModelConfig(moe=moe)


@pytest.mark.parametrize("sources", ["corpus/", 5, [3]])
def test_data_sources_must_be_a_list_of_paths(sources):
    with pytest.raises(ConfigError, match="data.sources must be a list of paths"):
        DataConfig(sources=sources)
