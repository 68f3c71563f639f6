"""``moekit quantize`` end to end on real files: Hugging Face folders of every family in, a quantized
folder out, ``from_pretrained`` back; and the bad inputs (one line, exit 2)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.cli import main
from moekit.interop import from_pretrained
from moekit.quant import kernels
from moekit.quant.convert import QuantConfig, quantize_model
from moekit.quant.modules import QuantizedExperts

import hf_tiny
from cli_helpers import assert_usage_error

ALL = "experts,shared,attention,dense"


def _hf_folder(tmp_path, arch: str):
    torch.manual_seed(0)
    model = hf_tiny.randomize(hf_tiny.build(arch))
    folder = tmp_path / arch
    model.save_pretrained(folder)
    return folder


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "deepseek_v4", "llama"])
def test_quantize_every_family_and_load_back(tmp_path, arch, capsys):
    src = _hf_folder(tmp_path, arch)
    out = tmp_path / "q"
    # DeepSeek-V4's attention holds matrices that are no nn.Linear (wo_a's grouped output
    # projection, the compressors' position biases): that scope refuses V4 (exit 2), so its
    # experts and shared experts are quantized here
    scope = {"llama": "attention,dense", "deepseek_v4": "experts,shared,dense"}.get(arch, ALL)
    assert main(["quantize", str(src), "--bits", "8", "--quantize-scope", scope, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["float_in_scope"] == [] and report["bytes_after"] < report["bytes_before"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["architectures"]
    loaded = from_pretrained(out)
    if arch != "llama":
        assert all(isinstance(layer.experts, QuantizedExperts) for layer in loaded.moe_layers())
    in_memory = from_pretrained(src)
    fp = _logits(in_memory, ids := torch.randint(0, hf_tiny.VOCAB, (2, 12)))
    quantize_model(in_memory, QuantConfig(bits=8, scope=tuple(scope.split(","))))
    assert torch.equal(_logits(loaded, ids), _logits(in_memory, ids))  # the file holds exactly what was computed
    # int8 changes the logits a little (on average: a flipped expert choice moves single entries more)
    rel = (_logits(loaded, ids) - fp).abs().mean() / fp.abs().mean()
    assert 0 < rel < 0.05


def _tiny_mixtral_int4_folder(tmp_path):
    """A Mixtral whose widths are multiples of 32, so int4 applies to every projection."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                        initializer_range=0.2)
    folder = tmp_path / "mixtral64"
    hf_tiny.randomize(MixtralForCausalLM(cfg)).save_pretrained(folder)
    return folder


@pytest.mark.skipif(not kernels.int4_available(), reason="this torch lacks the CPU int4 kernel")
def test_int4_folder_round_trip_and_bf16_load(tmp_path, capsys):
    src, out = _tiny_mixtral_int4_folder(tmp_path), tmp_path / "q4"
    assert main(["quantize", str(src), "--bits", "4", "--group-size", "32", "--quantize-scope", ALL,
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "int4 (group 32)" in text and "*experts" in text
    tensors = load_file(out / "model.safetensors")
    q = tensors["blocks.0.ffn.experts.w_in.qweight"]
    assert q.dtype == torch.uint8 and q.shape == (4, 64, 32)  # [E, 2F, D/2]: two codes a byte
    expert_tensors = {n.rpartition(".")[2] for n in tensors if ".experts." in n}
    assert expert_tensors == {"qweight", "scale", "zero"}  # no float w_in/w_out left beside them
    ids = torch.randint(0, 96, (1, 10))
    model = from_pretrained(out)
    in_memory = from_pretrained(src)
    quantize_model(in_memory, QuantConfig(bits=4, group_size=32, scope=tuple(ALL.split(","))))
    assert torch.equal(_logits(model, ids), _logits(in_memory, ids))
    bf16 = from_pretrained(out, dtype=torch.bfloat16)
    assert bf16.embed.weight.dtype == torch.bfloat16 and bf16.blocks[0].ffn.router.weight.dtype == torch.float32
    assert (_logits(bf16, ids).float() - _logits(model, ids)).abs().max() < 0.1 * _logits(model, ids).abs().max()


def _quantized(tmp_path, capsys):
    src, out = _hf_folder(tmp_path, "mixtral"), tmp_path / "q"
    assert main(["quantize", str(src), "--bits", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


def test_truncated_checkpoint_names_the_tensor(tmp_path, capsys):
    out = _quantized(tmp_path, capsys)
    path = out / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"is truncated: tensor '.*' needs bytes up to"):
        from_pretrained(out)
    assert_usage_error(["quantize", str(out), "--bits", "8", "--out", str(tmp_path / "again")], capsys, "already quantized")


def test_mismatched_missing_and_extra_tensors_are_named(tmp_path, capsys):
    out = _quantized(tmp_path, capsys)
    path = out / "model.safetensors"
    good = load_file(path)
    name = "blocks.1.ffn.experts.w_out.scale"
    for change, match in [
        (lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()), f"tensor '{name}' in .* is F32 \\[4, 31\\]"),
        (lambda t: t.__setitem__(name, t[name].to(torch.int8)), f"tensor '{name}' in .* is I8"),
        (lambda t: t.pop(name), f"tensor '{name}' is missing"),
        (lambda t: t.__setitem__("blocks.9.stray", torch.zeros(2)), "tensor 'blocks.9.stray' .* maps to nothing"),
    ]:
        tensors = dict(good)
        change(tensors)
        save_file(tensors, path)
        with pytest.raises(ValueError, match=match):
            from_pretrained(out)


def test_int4_without_the_kernel_says_so_and_uses_the_reference_only_when_asked(tmp_path, capsys, monkeypatch):
    src = _tiny_mixtral_int4_folder(tmp_path)
    monkeypatch.setattr(kernels, "int4_available", lambda: False)  # a torch without the op
    assert_usage_error(["quantize", str(src), "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "a")],
                     capsys, "lacks a working CPU int4 kernel")
    assert not (tmp_path / "a").exists()
    assert main(["quantize", str(src), "--bits", "4", "--group-size", "32", "--reference", "--out", str(tmp_path / "b")]) == 0
    model = from_pretrained(tmp_path / "b")
    assert model.moe_layers()[0].experts.w_in.kernel is False
    with torch.no_grad():
        model(torch.randint(0, 96, (1, 5)))


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    src = _hf_folder(tmp_path, "mixtral")  # widths 32 and 24: int4 groups of 32 do not divide 24
    assert_usage_error(["quantize", str(src), "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "x")],
                     capsys, "needs input widths divisible by it")
    assert_usage_error(["quantize", str(src), "--bits", "8", "--quantize-scope", "experts,routers", "--out",
                      str(tmp_path / "x")], capsys, "scope must be a non-empty subset")
    assert_usage_error(["quantize", str(tmp_path / "nope"), "--bits", "8", "--out", str(tmp_path / "x")], capsys,
                     "not a model folder")
    assert not (tmp_path / "x").exists()


def test_inspect_shows_memory_per_expert_format(capsys):
    assert main(["inspect", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip().startswith(("bf16 ", "int8 ", "int4 "))}
    assert set(lines) == {"bf16", "int8", "int4"}
    assert "90.19GB" in lines["bf16"] and "2 GPU(s)" in lines["bf16"] and "1 GPU(s)" in lines["int4"]
    assert main(["inspect", "mixtral-8x7b", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["quantized_experts"]
    assert q["int8"]["experts"] < 0.51 * q["bf16"]["experts"] and q["int4"]["experts"] < 0.29 * q["bf16"]["experts"]


def test_bench_quant_writes_medians_for_every_format(tmp_path, capsys):
    path = tmp_path / "q.json"
    assert main(["bench", "quant", "--d-model", "64", "--d-expert", "32", "--experts", "4", "--repeats", "5",
                 "--calls", "2", "--group-size", "32", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["format"] for r in rows] == ["fp32", "bf16", "int8", "int4"]
    assert all(len(r["times_us"]) == 5 and r["us_per_token"] > 0 for r in rows)
    assert rows[2]["expert_bytes"] < rows[1]["expert_bytes"] < rows[0]["expert_bytes"]
    assert "vs bf16" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_cached_generation_with_quantized_weights_equals_full_recompute(tmp_path, arch):
    """The KV-cache engine on a quantized model (every scope; DeepSeek-V3's absorbed MLA decode
    reads ``wkv_b.weight``, which a quantized Linear dequantizes) continues a prompt exactly as
    greedy decoding by full forwards of the same quantized model does."""
    from moekit.inference.engine import Engine
    from moekit.inference.sampling import SamplingParams

    model = from_pretrained(_hf_folder(tmp_path, arch))
    quantize_model(model, QuantConfig(bits=8, scope=tuple(ALL.split(","))))
    prompt = torch.randint(0, hf_tiny.VOCAB, (7,)).tolist()
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(_logits(model, torch.tensor([ids]))[0, -1].argmax()))
    (seq,) = Engine(model, max_batch=2).generate([prompt], SamplingParams(max_new_tokens=6, temperature=0))
    assert seq.output_ids == ids[len(prompt):]


def _dequantized_experts(model, qmodel):
    """``model`` (the float original) with each routed expert's matrices set to ``qmodel``'s
    dequantized ones; biases, activation and everything else as they were."""
    with torch.no_grad():
        for layer, qlayer in zip(model.moe_layers(), qmodel.moe_layers()):
            layer.experts.w_in.copy_(qlayer.experts.w_in.dequantize())
            layer.experts.w_out.copy_(qlayer.experts.w_out.dequantize())
    return model


@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=pytest.mark.skipif(
    not kernels.int4_available(), reason="this torch lacks the CPU int4 kernel"))])
@pytest.mark.parametrize("arch, width", [("gpt_oss", "intermediate_size"), ("deepseek_v4", "moe_intermediate_size")])
def test_experts_with_biases_and_clamped_swiglus_quantize_round_trip_and_generate(tmp_path, arch, width, bits):
    """GPT-OSS (expert biases, clamped SwiGLU) and DeepSeek-V4 (limited SwiGLU): the quantized
    model equals the float one holding the dequantized matrices (same biases, same clamps), the
    folder stores the biases in float under the float names and loads back exactly, and cached
    generation equals greedy full recompute."""
    import copy

    from moekit.inference.engine import Engine
    from moekit.inference.sampling import SamplingParams

    torch.manual_seed(0)
    src = tmp_path / arch
    hf_tiny.build(arch, **{width: 32}).save_pretrained(src)
    fp = from_pretrained(src)
    qmodel = copy.deepcopy(fp)
    cov = quantize_model(qmodel, QuantConfig(bits=bits, group_size=32))
    experts = qmodel.moe_layers()[0].experts
    assert isinstance(experts, QuantizedExperts) and experts.act_args == fp.moe_layers()[0].experts.act_args != ()
    assert experts.has_bias == (arch == "gpt_oss") and cov.float_in_scope == []
    ids = torch.randint(0, hf_tiny.VOCAB, (2, 12))
    want = _logits(_dequantized_experts(copy.deepcopy(fp), qmodel), ids)
    torch.testing.assert_close(_logits(qmodel, ids), want, atol=1e-4, rtol=1e-4)
    assert (_logits(qmodel, ids) - _logits(fp, ids)).abs().max() > 1e-4  # something was rounded
    from moekit.quant.checkpoint import save_quantized

    out = save_quantized(qmodel, tmp_path / "q")
    stored = load_file(out / "model.safetensors")
    biases = [n for n in stored if n.endswith((".experts.b_in", ".experts.b_out"))]
    assert len(biases) == (2 * len(fp.moe_layers()) if arch == "gpt_oss" else 0)
    assert all(stored[n].is_floating_point() for n in biases)
    loaded = from_pretrained(out)
    assert torch.equal(_logits(loaded, ids), _logits(qmodel, ids))
    prompt = torch.randint(0, hf_tiny.VOCAB, (7,)).tolist()
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(_logits(loaded, torch.tensor([seq]))[0, -1].argmax()))
    (got,) = Engine(loaded, max_batch=2).generate([prompt], SamplingParams(max_new_tokens=5, temperature=0))
    assert got.output_ids == seq[len(prompt):]
