"""Checkpoint layouts that must load: sharded, bf16, tied embeddings, per-expert and fused experts."""

import json

import pytest
import torch
from hf_tiny import SEQ, VOCAB, build, llama
from safetensors import safe_open
from safetensors.torch import save_file

import moekit
from moekit.interop.checkpoint import INDEX

transformers = pytest.importorskip("transformers")
ATOL = 1e-4


def logits_diff(ref, model, ids=None) -> float:
    ids = torch.randint(0, VOCAB, (2, SEQ)) if ids is None else ids
    with torch.no_grad():
        return (ref(input_ids=ids).logits.float() - model(ids).logits.float()).abs().max().item()


def tensor_names(folder) -> set[str]:
    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    return names


def test_sharded_checkpoint_loads_and_exports_sharded(tmp_path):
    ref = build("qwen2_moe")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    model = moekit.from_pretrained(tmp_path / "hf")
    assert logits_diff(ref, model) <= ATOL

    model.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    weight_map = json.loads((tmp_path / "out" / INDEX).read_text())["weight_map"]
    assert len(shards) > 2 and sorted(set(weight_map.values())) == shards
    assert set(weight_map) == tensor_names(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert logits_diff(back, model) <= ATOL
    # A smaller save into the same folder leaves no stale shard behind.
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / INDEX).exists()


def test_bf16_checkpoint(tmp_path):
    ref = build("deepseek_v3").to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf")
    assert model.embed.weight.dtype == torch.bfloat16
    router = model.moe_layers()[0].router
    assert router.weight.dtype == torch.float32 and router.expert_bias.dtype == torch.float32
    # Upcast both sides: same bf16 weights, fp32 arithmetic -> fp32 parity.
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model32 = moekit.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    assert logits_diff(ref32, model32, ids) <= ATOL
    with torch.no_grad():  # the bf16 model tracks its fp32 twin (on average: a near tie in
        # the router may pick another expert in bf16, which moves a few logits by ~1)
        assert (model(ids).logits.float() - model32(ids).logits).abs().mean() < 0.05
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_device_argument(device, tmp_path):
    ref = build("mixtral")
    ref.save_pretrained(tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf", dtype=torch.float32, device=torch.device(device))
    tensors = list(model.parameters()) + list(model.buffers())
    assert {t.device.type for t in tensors} == {device}
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        logits = model(ids.to(device)).logits.cpu()
        assert (ref(input_ids=ids).logits - logits).abs().max().item() <= ATOL


def test_tied_embeddings(tmp_path):
    ref = llama(tie=True).eval()
    ref.save_pretrained(tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf")
    assert model.cfg.tie_embeddings and model.lm_head.weight is model.embed.weight
    assert logits_diff(ref, model) <= ATOL
    model.save_pretrained(tmp_path / "out")
    assert "lm_head.weight" not in tensor_names(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    assert logits_diff(back, model) <= ATOL


@pytest.mark.parametrize("arch, per_expert", [("mixtral", "experts.0.w1.weight"), ("olmoe", "experts.0.gate_proj.weight")])
def test_per_expert_layout_is_what_transformers_writes(arch, per_expert, tmp_path):
    ref = build(arch)
    ref.save_pretrained(tmp_path)
    names = tensor_names(tmp_path)
    assert any(n.endswith(per_expert) for n in names) and not any("gate_up_proj" in n for n in names)
    assert logits_diff(ref, moekit.from_pretrained(tmp_path)) <= ATOL


def _write_fused(ref, folder) -> None:
    """transformers 5's in-memory names: experts fused as mlp.experts.gate_up_proj / down_proj."""
    ref.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_fused_expert_layout_loads_and_exports(arch, tmp_path):
    ref = build(arch)
    _write_fused(ref, tmp_path / "hf")
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in tensor_names(tmp_path / "hf"))
    model = moekit.from_pretrained(tmp_path / "hf")
    assert logits_diff(ref, model) <= ATOL
    model.save_pretrained(tmp_path / "out", expert_layout="fused")
    out_names = tensor_names(tmp_path / "out")
    assert any(n.endswith("mlp.experts.down_proj") for n in out_names)
    assert not any(".experts.0." in n for n in out_names)
    again = moekit.from_pretrained(tmp_path / "out")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert logits_diff(back, model) <= ATOL


def test_per_expert_checkpoint_split_by_hand(tmp_path):
    """A checkpoint written per expert from the fused tensors (as the published Qwen/DeepSeek
    files are), independently of both transformers' and moekit's writers."""
    ref = build("qwen3_moe")
    ref.save_pretrained(tmp_path)
    state = {}
    for name, t in ref.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2F, D], gate rows first
            base = name.removesuffix("gate_up_proj")
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                state[f"{base}{e}.gate_proj.weight"], state[f"{base}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):  # [E, D, F]
            base = name.removesuffix("down_proj")
            for e, w in enumerate(t):
                state[f"{base}{e}.down_proj.weight"] = w
        else:
            state[name] = t
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    assert logits_diff(ref, moekit.from_pretrained(tmp_path)) <= ATOL
