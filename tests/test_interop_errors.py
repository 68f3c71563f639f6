"""Bad checkpoints fail with one clear message naming the problem, before anything is loaded."""

import json

import pytest
import torch
from hf_tiny import build
from safetensors.torch import load_file, save_file

import moekit
from moekit.cli import main
from moekit.errors import ModelFolderError, UsageError
from moekit.interop import supported_architectures
from moekit.interop.checkpoint import INDEX, Checkpoint

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral")
    build("mixtral").save_pretrained(folder)
    return folder


@pytest.fixture
def copy_of(mixtral_dir, tmp_path):
    """A fresh copy of the Mixtral folder, and its tensors to rewrite."""
    (tmp_path / "config.json").write_text((mixtral_dir / "config.json").read_text())
    return tmp_path, load_file(str(mixtral_dir / "model.safetensors"))


@pytest.fixture
def no_reads(monkeypatch):
    """Fails the test if any tensor data is read: errors must come from headers alone."""
    def refuse(self, name):
        raise AssertionError(f"tensor {name} was read before the checkpoint was validated")

    monkeypatch.setattr(Checkpoint, "get", refuse)


def test_unsupported_architecture_lists_the_supported_ones(copy_of):
    folder, _ = copy_of
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        moekit.from_pretrained(folder)
    for arch in supported_architectures():
        assert arch in str(e.value)
    assert len(supported_architectures()) == 13


@pytest.mark.parametrize("field, value", [("n_shared_experts", 2), ("norm_topk_prob", False), ("scoring_func", "softmax"),
                                          ("num_key_value_heads", 2)])
def test_deepseek_v4_field_moekit_would_ignore_is_refused_by_name(copy_of, capsys, field, value):
    """transformers' V4 builds one shared expert, always renormalizes, ... : a config that says
    otherwise is refused naming the field, rather than loaded as a different model."""
    folder, _ = copy_of
    (folder / "config.json").write_text(json.dumps({"architectures": ["DeepseekV4ForCausalLM"],
                                                    "model_type": "deepseek_v4", field: value}))
    with pytest.raises(ValueError, match=f"{field}={value!r} is not supported"):
        moekit.from_pretrained(folder)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and field in err


def test_missing_shard_is_named(tmp_path, no_reads):
    build("olmoe").save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    gone = sorted(set(weight_map.values()))[1]
    (tmp_path / gone).unlink()
    with pytest.raises(ValueError, match=f"shard {gone} is missing"):
        moekit.from_pretrained(tmp_path)


def test_missing_tensor_names_tensor_and_file(copy_of, no_reads):
    folder, state = copy_of
    del state["model.norm.weight"]  # filled late in the plan: nothing may be read before
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*model\.safetensors"):
        moekit.from_pretrained(folder)


def test_missing_expert_tensor_in_a_sharded_checkpoint_names_its_shard(tmp_path, no_reads):
    build("mixtral").save_pretrained(tmp_path, max_shard_size="20KB")
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    shard = json.loads((tmp_path / INDEX).read_text())["weight_map"][name]
    state = load_file(str(tmp_path / shard))
    del state[name]
    save_file(state, str(tmp_path / shard))
    with pytest.raises(ValueError, match=rf"'{name}'.*missing from {shard}"):
        moekit.from_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_file(copy_of, no_reads):
    folder, state = copy_of
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    state[name] = torch.randn(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"'{name}' in model\.safetensors has shape \[25, 32\]"):
        moekit.from_pretrained(folder)


def test_unmapped_tensors_are_listed(copy_of, no_reads):
    folder, state = copy_of
    extra = ["model.layers.0.block_sparse_moe.experts.4.w1.weight", "model.layers.0.mlp.mystery.weight"]
    for name in extra:
        state[name] = torch.randn(4, 4)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="map to nothing") as e:
        moekit.from_pretrained(folder)
    for name in extra:
        assert repr(name) in str(e.value)


def test_deepseek_multi_token_prediction_layer_is_skipped_with_a_note(tmp_path):
    ref = build("deepseek_v3")
    ref.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    n = ref.config.num_hidden_layers  # the MTP layer sits after the last decoder layer
    for name, t in list(state.items()):
        if name.startswith("model.layers.2."):
            state[name.replace("model.layers.2.", f"model.layers.{n}.")] = t.clone()
    state[f"model.layers.{n}.eh_proj.weight"] = torch.randn(32, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="multi-token-prediction"):
        model = moekit.from_pretrained(tmp_path)
    assert model.cfg.n_layers == n


def test_quantized_and_bin_checkpoints_are_refused(copy_of, mixtral_dir):
    folder, _ = copy_of
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        moekit.from_pretrained(folder)
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors"):
        moekit.from_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantized checkpoints \\(fp8\\)"):
        moekit.from_pretrained(folder)


def test_export_refuses_what_the_target_cannot_express(mixtral_dir, tmp_path):
    model = moekit.from_pretrained(mixtral_dir)
    with pytest.raises(ValueError, match="OlmoeForCausalLM cannot represent this model: qk_norm=None"):
        model.save_pretrained(tmp_path, architecture="OlmoeForCausalLM")
    native = moekit.MoETransformer(moekit.get_preset("tiny-switch"))
    with pytest.raises(ValueError, match="pass architecture=, one of: MixtralForCausalLM"):
        native.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_cli_inspect_unsupported_config_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unsupported architecture 'FooForCausalLM'" in err and "Qwen3MoeForCausalLM" in err


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/model.safetensors", "sub/../../x.safetensors"])
def test_an_index_entry_outside_the_model_folder_is_refused(copy_of, tmp_path, shard, no_reads):
    folder, tensors = copy_of
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text((folder / "config.json").read_text())
    (folder / "other").mkdir()
    save_file(tensors, str(folder / "other" / "model.safetensors"))  # a real file the entry could reach
    (folder / "model" / INDEX).write_text(json.dumps({"weight_map": {name: shard for name in tensors}}))
    with pytest.raises(ValueError, match=f"lists shard '{shard}', which is not inside"):
        moekit.from_pretrained(folder / "model")


def test_nan_in_a_hugging_face_checkpoint_is_named(copy_of):
    folder, tensors = copy_of
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=f"tensor '{name}' in model.safetensors holds 1 NaN/inf value"):
        moekit.from_pretrained(folder)
    model = moekit.from_pretrained(folder, check_finite=False)
    assert torch.isnan(model.blocks[0].attn.wq.weight).sum() == 1


def test_bad_checkpoint_errors_are_the_usage_kind_and_still_value_errors(copy_of):
    folder, tensors = copy_of
    tensors.pop("model.norm.weight")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelFolderError) as e:
        moekit.from_pretrained(folder)
    assert isinstance(e.value, UsageError) and isinstance(e.value, ValueError)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="no model.safetensors"):
        moekit.from_pretrained(folder)
