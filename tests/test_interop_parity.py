"""moekit.from_pretrained / save_pretrained against transformers: logits and greedy text, both ways.

For each architecture a tiny random model is built with transformers' own classes (see hf_tiny),
saved, loaded into moekit, and compared on random token ids; then moekit exports it and
transformers loads the export, which must hold the very same tensors and give the same logits.
"""

import pytest
import torch
from hf_tiny import BUILDERS, SEQ, VOCAB, build, greedy, hf_logits, mk_logits

import moekit
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
# Which layers each tiny config makes MoE: the layer pattern fields are read, not assumed.
MOE_LAYERS = {
    "mixtral": [0, 1], "qwen2_moe": [0, 2], "qwen3_moe": [1, 3], "olmoe": [0, 1],
    "deepseek_v3": [1, 2], "deepseek_v3_plain": [1, 2], "gpt_oss": [0, 1, 2], "deepseek_v2": [1, 2], "deepseek_v2_lite": [1, 2], "deepseek_v4": [0, 1, 2, 3], "llama4": [1, 3], "llama": [], "mistral": [], "qwen2": [],
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_logits_and_greedy_match_transformers_both_ways(arch, tmp_path):
    ref = build(arch)
    ref.save_pretrained(tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf")
    assert model.cfg.moe_layer_ids == MOE_LAYERS[arch]
    assert model.cfg.hf_architecture == type(ref).__name__
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = model(ids).logits
    assert want.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert max_diff(got, want) <= ATOL
    want_tokens = greedy(hf_logits(ref), ids)
    assert torch.equal(greedy(mk_logits(model), ids), want_tokens)

    model.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(ref)
    ref_state, back_state = ref.state_dict(), back.state_dict()
    assert ref_state.keys() == back_state.keys()
    for name, t in ref_state.items():
        assert torch.equal(back_state[name], t), name  # fp32 in, fp32 out: bit for bit
    with torch.no_grad():  # same class, same tensors: its greedy text is want_tokens, as checked above
        assert max_diff(back(input_ids=ids).logits, got) <= ATOL


def test_deepseek_correction_bias_steers_the_choice(tmp_path):
    """The random e_score_correction_bias changes which experts win: a bias that failed to load
    (left at zero) would change the logits, so the parity test above can fail on it."""
    ref = build("deepseek_v3")
    ref.save_pretrained(tmp_path)
    model = moekit.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    bias = model.moe_layers()[0].router.expert_bias
    assert bias.dtype == torch.float32 and bias.abs().min() > 0
    with torch.no_grad():
        with_bias = model(ids).logits
        bias.zero_()
        without = model(ids).logits
    assert max_diff(with_bias, without) > 1e-2


def _native(moe: bool) -> moekit.MoETransformer:
    cfg = moekit.ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=64, init_std=0.2,
        moe=moekit.MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2) if moe else None,
    )
    model = moekit.MoETransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch, moe", [("MixtralForCausalLM", True), ("LlamaForCausalLM", False)])
def test_native_model_exports_to_a_transformers_architecture(arch, moe, tmp_path):
    """A model built in moekit (not loaded) exports as a chosen architecture: the path for
    upcycled or trained-from-scratch models."""
    model = _native(moe)
    model.save_pretrained(tmp_path, architecture=arch)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == arch
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        assert max_diff(back(input_ids=ids).logits, model(ids).logits) <= ATOL


def test_llama4_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """Llama4ForConditionalGeneration: the language model loads (vision tensors skipped with a
    note) with the multimodal model's text logits; it exports as Llama4ForCausalLM, which
    transformers loads with the same logits; exporting as the multimodal class is refused."""
    from hf_tiny import llama4_multimodal, randomize

    ref = randomize(llama4_multimodal())
    ref.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match=r"vision tensor\(s\).*language model only"):
        model = moekit.from_pretrained(tmp_path / "hf")
    assert model.cfg.hf_architecture == "Llama4ForConditionalGeneration" and model.cfg.moe_layer_ids == [1, 3]
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():  # the multimodal class's own text-only forward fails in transformers 5.24
        want, got = ref.language_model(input_ids=ids).logits, model(ids).logits
    assert want.abs().max() > 1.0 and max_diff(got, want) <= ATOL
    with pytest.raises(ValueError, match="save it with architecture='Llama4ForCausalLM'"):
        model.save_pretrained(tmp_path / "refused")
    model.save_pretrained(tmp_path / "out", architecture="Llama4ForCausalLM")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "Llama4ForCausalLM"
    with torch.no_grad():
        assert max_diff(back(input_ids=ids).logits, want) <= ATOL


def test_deepseek_v4_loads_the_release_names(tmp_path):
    """DeepSeek's own release spells the tensors without transformers' "model." prefix (embed.weight,
    layers.{i}.attn.wq_a.weight, hc_head_fn, ...): moekit reads them as transformers' loader does."""
    from safetensors.torch import load_file, save_file

    from moekit.interop.deepseek_v4 import release_name

    ref = build("deepseek_v4")
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {release_name(k): v for k, v in tensors.items()}
    assert "embed.weight" in renamed and "layers.0.attn.wq_a.weight" in renamed and "hc_head_fn" in renamed
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = moekit.from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, model(ids).logits
        assert max_diff(back(input_ids=ids).logits, want) == 0  # transformers reads the release names too
    assert max_diff(got, want) <= ATOL


def test_deepseek_v4_in_bf16_keeps_hyper_connections_in_fp32_as_transformers_does(tmp_path):
    """transformers keeps V4's hyper-connection weights in fp32 in a bf16 model; so does moekit, on
    load and on export; its bf16 logits stay near the fp32 model's."""
    ref = build("deepseek_v4")
    ref.save_pretrained(tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert model.blocks[0].attn_hc.fn.dtype == model.hc_head.fn.dtype == torch.float32
    assert model.blocks[0].attn.wq_a.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, model(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0) > 0.995
    model.save_pretrained(tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.hc_attn_fn").get_dtype() == "F32"
        assert f.get_slice("model.layers.0.attn.wq_a.weight").get_dtype() == "BF16"
