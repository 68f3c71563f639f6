"""Quantized models on the commands that load them: `--quantize` at load on generate (and
load_for_inference / from_pretrained), a folder `moekit quantize` wrote from a training run
loading like a Hugging Face one and generating exactly as quantize-at-load does, and the bad
inputs (a truncated folder, int4 on a torch without the op) as one line with exit status 2."""

import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import MoEConfig, ModelConfig
from moekit.cli import main
from moekit.inference.loading import load_for_inference
from moekit.interop import from_pretrained
from moekit.offload.trace import check_trace_matches, load_trace, model_config_of
from moekit.quant import kernels
from moekit.quant.convert import QuantConfig, quantize_model
from moekit.quant.modules import QuantizedExperts

import hf_tiny
from cli_helpers import assert_usage_error


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real, tiny training run whose widths (32) take int4 groups of 32."""
    from rich.console import Console

    from moekit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("quant_run")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 60)
    (root / "corpus" / "b.txt").write_text("class A:\n    pass\n" * 60)
    model = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64,
                        moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2))
    cfg = TrainConfig.from_dict(dict(data=dict(sources=[str(root / "corpus")], tokenizer="bytes", val_fraction=0.5),
                                     seq_len=32, batch_size=4, max_steps=3, eval_every=3, eval_batches=1,
                                     device="cpu", cache_dir=str(root / "cache")))
    train(cfg, model, root / "run", console=Console(file=io.StringIO()))
    return root / "run"


def _generate(argv, capsys) -> list[int]:
    capsys.readouterr()
    assert main(["generate", *argv, "--prompt", "def f(x):", "--max-new-tokens", "12", "--temperature", "0",
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)["output_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _bits_cases():
    return [(8, [])] + ([(4, ["--group-size", "32"])] if kernels.int4_available() else [])


@pytest.mark.parametrize("bits, extra", _bits_cases())
def test_a_quantized_folder_from_a_run_loads_and_generates_as_quantize_at_load(run, tmp_path, capsys, bits, extra):
    out = tmp_path / "q"
    assert main(["quantize", str(run), "--bits", str(bits), *extra, "--out", str(out)]) == 0
    folder_model, tok, _ = load_for_inference(out)
    assert all(isinstance(layer.experts, QuantizedExperts) for layer in folder_model.moe_layers())
    at_load, tok_run, _ = load_for_inference(run, quantize=QuantConfig(bits=bits, group_size=32))
    ids = torch.randint(0, 257, (2, 20))
    assert torch.equal(_logits(folder_model, ids), _logits(at_load, ids))
    assert tok.encode("def f(x):") == tok_run.encode("def f(x):")
    float_ids = _generate([str(run)], capsys)
    from_folder = _generate([str(out)], capsys)
    assert from_folder == _generate([str(run), "--quantize", str(bits), *extra], capsys)
    assert len(from_folder) == 12 and float_ids != [] and from_folder != []
    # the folder's config is the run's architecture: a trace of the run matches it
    assert main(["trace", str(run), "--data", str(run.parent / "corpus"), "--out", str(tmp_path / "t.trace"),
                 "--max-tokens", "64", "--decode-tokens", "0", "--quantize", str(bits), *extra]) == 0
    header = load_trace(tmp_path / "t.trace").header
    check_trace_matches(header, model_config_of(str(out)), str(out))
    assert header.expert_dtype == f"int{bits}" and header.expert_bytes < 3 * 32 * 32 * 4 // 2  # fp32: 12 KB
    if bits == 8:  # int8 codes for w_in [64, 32] and w_out [32, 32], one fp32 scale a row
        assert header.expert_bytes == 3 * 32 * 32 + 96 * 4


def test_from_pretrained_quantizes_at_load(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "mixtral"
    hf_tiny.randomize(hf_tiny.build("mixtral")).save_pretrained(folder)
    model = from_pretrained(folder, quantize=8)
    reference = from_pretrained(folder)
    quantize_model(reference, QuantConfig(bits=8))
    ids = torch.randint(0, hf_tiny.VOCAB, (1, 9))
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    assert all(isinstance(layer.experts, QuantizedExperts) for layer in model.moe_layers())
    assert main(["quantize", str(folder), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    assert torch.equal(_logits(from_pretrained(tmp_path / "q", quantize=8), ids), _logits(model, ids))  # as it is
    with pytest.raises(ValueError, match=r"already quantized \(int8\); quantize its float original to int4"):
        from_pretrained(tmp_path / "q", quantize=QuantConfig(bits=4, group_size=32))


def test_generate_on_a_truncated_quantized_folder_names_the_tensor(run, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(run), "--bits", "8", "--out", str(out)]) == 0
    path = out / "model.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[:-64])
    assert_usage_error(["generate", str(out), "--prompt", "x"], capsys, "is truncated: tensor '")
    path.write_bytes(good)
    t = load_file(path)
    t["blocks.0.ffn.experts.w_in.scale"] = t["blocks.0.ffn.experts.w_in.scale"][:, :-1].contiguous()
    save_file(t, path)
    assert_usage_error(["generate", str(out), "--prompt", "x"], capsys, "tensor 'blocks.0.ffn.experts.w_in.scale'")


def test_int4_without_the_kernel_is_one_line_and_the_reference_only_when_asked(run, tmp_path, capsys, monkeypatch):
    q4 = tmp_path / "q4"
    reference = [] if kernels.int4_available() else ["--reference"]
    assert main(["quantize", str(run), "--bits", "4", "--group-size", "32", *reference, "--out", str(q4)]) == 0
    monkeypatch.setattr(kernels, "int4_available", lambda: False)  # a torch without the op
    for argv in (["generate", str(run), "--quantize", "4", "--group-size", "32"], ["generate", str(q4)],
                 ["trace", str(run), "--data", str(run.parent / "corpus"), "--out", str(tmp_path / "t"),
                  "--quantize", "4", "--group-size", "32"]):
        assert_usage_error([*argv, "--prompt", "x"] if argv[0] == "generate" else argv, capsys,
                         "lacks a working CPU int4 kernel")
    assert not (tmp_path / "t").exists()
    at_load = _generate([str(run), "--quantize", "4", "--group-size", "32", "--reference"], capsys)
    assert _generate([str(q4), "--reference"], capsys) == at_load
    model, _, _ = load_for_inference(q4, reference=True)
    assert model.moe_layers()[0].experts.w_in.kernel is False


def test_chat_quantizes_at_load_as_the_quantized_folder_chats(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from hf_tokenizers import qwen_like

    import moekit
    from moekit.inference.tokenization import load_tokenizer

    folder = tmp_path / "hf"
    qwen_like(folder, chat_template=(Path(__file__).parent / "fixtures" / "chat_templates" / "qwen2.jinja").read_text())
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=load_tokenizer(folder).vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=40, max_seq_len=128, init_std=0.3, moe=MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2))
    moekit.MoETransformer(cfg).save_pretrained(folder, architecture="MixtralForCausalLM")
    assert main(["quantize", str(folder), "--bits", "8", "--out", str(tmp_path / "q")]) == 0

    def chat(argv) -> str:
        monkeypatch.setattr("sys.stdin", io.StringIO("which expert?\n/exit\n"))
        capsys.readouterr()
        assert main(["chat", *argv, "--max-new-tokens", "10", "--temperature", "0"]) == 0
        return capsys.readouterr().out

    reply = chat([str(folder), "--quantize", "8"])
    assert reply.strip() and reply == chat([str(tmp_path / "q")])


@pytest.mark.parametrize("cmd", ["generate", "eval"])
@pytest.mark.parametrize("flag", [["--quantize-scope", "experts,attention"], ["--group-size", "32"]])
def test_quantize_options_without_quantize_are_refused_not_ignored(run, capsys, cmd, flag):
    argv = [cmd, str(run), *flag] + (["--prompt", "x"] if cmd == "generate" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{flag[0]} needs --quantize 8 or --quantize 4 (it sets how to quantize at load)")
    assert err.count("\n") == 0
