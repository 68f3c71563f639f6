"""Streaming load (``moekit.offload.stream``): a folder's experts go to the store one layer at a
time. The streamed model generates bit-identically to the in-memory one (HF folders per expert
and fused 3-D, a run folder, int8 at load, a `moekit quantize` folder), and its load-time peak
RSS, measured in a child process, stays far below the whole model's."""

import json
import subprocess
import sys
import textwrap

import hf_tiny
import pytest
import torch
from offload_helpers import generate_with_logits as _generate
from offload_helpers import same_run as _same

from moekit import ModelConfig, MoEConfig, MoETransformer
from moekit.data import DataConfig
from moekit.data.tokenizer import bytes_tokenizer
from moekit.errors import UsageError
from moekit.inference.loading import load_for_inference
from moekit.interop import from_pretrained
from moekit.offload.runtime import OffloadConfig, offload_model
from moekit.offload.stream import load_offloaded
from moekit.quant.checkpoint import save_quantized
from moekit.quant.convert import QuantConfig, quantize_model
from moekit.training import TrainConfig
from moekit.training.checkpoint import save_checkpoint
from moekit.training.run import write_run_files

pytest.importorskip("transformers")




def _one_slot(model) -> float:
    """A budget of one expert slot per MoE layer (forces misses and evictions)."""
    from moekit.offload.store import ExpertLayout

    layout = ExpertLayout.of(model.moe_layers()[0].experts.state_dict())
    return len(model.moe_layers()) * layout.slot_bytes / 1e9


def _check_stream(ref_model, streamed, prompts):
    """``streamed`` (offloaded at load) generates exactly as ``ref_model`` in memory."""
    try:
        assert type(streamed.moe_layers()[0].experts).__name__ == "OffloadedExperts"
        assert _same(_generate(streamed, prompts), _generate(ref_model, prompts))
        assert streamed.offload.stats.misses > 0
    finally:
        streamed.offload.close()


def _hf_folder(tmp_path, arch: str, fused: bool = False):
    torch.manual_seed(0)
    folder = tmp_path / arch
    _olmoe32().save_pretrained(folder) if arch == "olmoe32" else hf_tiny.build(arch).save_pretrained(folder)
    if fused:  # rewrite with the experts as 3-D gate_up_proj / down_proj tensors
        from_pretrained(folder).save_pretrained(tmp_path / "fused", expert_layout="fused")
        folder = tmp_path / "fused"
    return folder


def _olmoe32():
    """hf_tiny's OLMoE with expert widths int4's group size divides (8 experts, top-3)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(**hf_tiny._common(intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
                                        num_experts=8, num_experts_per_tok=3))
    return hf_tiny.randomize(OlmoeForCausalLM(cfg))


@pytest.mark.parametrize("arch, fused", [("mixtral", False), ("qwen2_moe", False), ("olmoe", True)])
def test_streamed_hf_folder_generates_bit_identically(tmp_path, arch, fused):
    folder = _hf_folder(tmp_path, arch, fused)
    if fused:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert any(n.endswith("experts.gate_up_proj") for n in f.keys())
    ref = from_pretrained(folder, dtype=torch.float32)
    prompts = [torch.randint(0, hf_tiny.VOCAB, (n,)).tolist() for n in (9, 5)]
    streamed = from_pretrained(folder, dtype=torch.float32,
                               offload=OffloadConfig(cache_gb=_one_slot(ref), prefetch=False))
    assert streamed.hf_config == ref.hf_config
    _check_stream(ref, streamed, prompts)


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_int4_at_load_and_a_quantized_folder_stream_bit_identically(tmp_path, bits):
    folder = _hf_folder(tmp_path, "olmoe32")
    qcfg = QuantConfig(bits=bits, group_size=32)
    ref = from_pretrained(folder, dtype=torch.float32)
    quantize_model(ref, qcfg)
    budget = 2 * _one_slot(ref)
    prompts = [torch.randint(0, hf_tiny.VOCAB, (7,)).tolist()]
    _check_stream(ref, from_pretrained(folder, dtype=torch.float32, quantize=qcfg,
                                       offload=OffloadConfig(cache_gb=budget)), prompts)
    save_quantized(ref, tmp_path / "q")
    streamed = from_pretrained(tmp_path / "q", offload=OffloadConfig(cache_gb=budget, store="ram"))
    assert streamed.quantization.bits == bits
    _check_stream(ref, streamed, prompts)
    # the commands' path: folder_kind calls a quantized folder written from an HF model "hf"
    streamed = load_offloaded(tmp_path / "q", "hf", OffloadConfig(cache_gb=budget), quantize=qcfg)
    _check_stream(ref, streamed, prompts)
    with pytest.raises(ValueError, match=f"already quantized \\(int{bits}\\)"):  # quantizing twice stacks errors
        load_offloaded(tmp_path / "q", "hf", OffloadConfig(cache_gb=budget), quantize=12 - bits)


def test_quantize_scope_beyond_experts_is_applied_after_streaming(tmp_path):
    folder = _hf_folder(tmp_path, "qwen2_moe")
    qcfg = QuantConfig(bits=8, scope=("experts", "shared", "attention"))
    ref = from_pretrained(folder, dtype=torch.float32)
    quantize_model(ref, qcfg)
    streamed = from_pretrained(folder, quantize=qcfg, offload=OffloadConfig(cache_gb=2 * _one_slot(ref)))
    assert type(streamed.blocks[0].attn.wq).__name__ == "QuantizedLinear"
    _check_stream(ref, streamed, [torch.randint(0, hf_tiny.VOCAB, (6,)).tolist()])


def test_streamed_run_folder_bf16_generates_bit_identically(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=3, n_heads=2, d_ff=64, max_seq_len=48,
                      moe=MoEConfig(d_model=32, d_expert=32, num_experts=6, top_k=2), first_dense_layers=1)
    write_run_files(tmp_path, TrainConfig(data=DataConfig(tokenizer="bytes"), seq_len=32), cfg, bytes_tokenizer())
    save_checkpoint(tmp_path, MoETransformer(cfg), {"step": 3})
    ref, _, _ = load_for_inference(tmp_path, dtype="bf16")
    streamed, _, _ = load_for_inference(tmp_path, dtype="bf16",
                                        offload=OffloadConfig(cache_gb=_one_slot(ref), store_dir=str(tmp_path / "s")))
    assert next(streamed.parameters()).dtype == torch.bfloat16 and (tmp_path / "s" / "offload.json").is_file()
    _check_stream(ref, streamed, [list(b"the router learns")])


def test_a_lora_run_is_loaded_whole_then_offloaded_with_a_note(tmp_path, capsys):
    """Its adapters are merged into the experts, so nothing can stream: said, not skipped."""
    from moekit.adapt.lora import apply_lora

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=48,
                      moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2))
    tcfg = TrainConfig(data=DataConfig(tokenizer="bytes"), seq_len=32, trainable="lora", lora_rank=4)
    write_run_files(tmp_path, tcfg, cfg, bytes_tokenizer())
    model = MoETransformer(cfg)
    apply_lora(model, tcfg.lora_config())
    for n, p in model.named_parameters():
        if "lora" in n:
            p.data.normal_(0, 0.1)  # B starts at zero: make the adapters change the model
    save_checkpoint(tmp_path, model, {"step": 1})
    ref, _, _ = load_for_inference(tmp_path)
    capsys.readouterr()
    streamed, _, _ = load_for_inference(tmp_path, offload=OffloadConfig(cache_gb=_one_slot(ref)))
    assert "a LoRA run" in capsys.readouterr().err
    _check_stream(ref, streamed, [list(b"adapters")])


def test_a_budget_without_one_slot_per_layer_fails_before_anything_is_written(tmp_path):
    folder = _hf_folder(tmp_path, "mixtral")
    with pytest.raises(UsageError, match="holds no expert per MoE layer"):
        from_pretrained(folder, offload=OffloadConfig(cache_gb=1e-9, store_dir=str(tmp_path / "store")))
    assert not (tmp_path / "store").exists()


def test_a_bad_expert_tensor_is_named_and_nothing_is_returned(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _hf_folder(tmp_path, "mixtral")
    state = load_file(str(folder / "model.safetensors"))
    name = next(n for n in state if "layers.1" in n and "experts.2" in n)
    state[name][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name}.*NaN"):
        from_pretrained(folder, offload=OffloadConfig(cache_gb=1.0))


# -- load-time peak RSS -------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    def rss(field):
        return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                    if l.startswith(field + ":"))
    from moekit.interop import from_pretrained
    from moekit.offload.runtime import OffloadConfig
    import moekit.offload.stream
    torch.set_num_threads(1)
    before = rss("VmRSS")
    budget = float(sys.argv[2])
    model = from_pretrained(sys.argv[1], offload=OffloadConfig(cache_gb=budget) if budget else None)
    print(json.dumps({"peak_over_start": rss("VmHWM") - before, "end_over_start": rss("VmRSS") - before}))
""")


def _load_peak(folder, budget_gb: float) -> int:
    p = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(budget_gb)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_over_start"]


def test_streamed_load_peak_rss_stays_near_one_layer_not_the_model(tmp_path):
    """8 MoE layers x 8 experts of 0.79 MB = 50 MB of fp32 experts, 4 MB of the rest, and a
    cache of one expert per layer (6.3 MB, 1/8 of the experts). In memory the load peaks at
    every expert; streamed, at the rest + one 6.3 MB layer (and its copies while written) + the cache."""
    cfg = ModelConfig(vocab_size=4096, d_model=128, n_layers=8, n_heads=4, d_ff=256, max_seq_len=64,
                      moe=MoEConfig(d_model=128, d_expert=512, num_experts=8, top_k=2))
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    model.save_pretrained(tmp_path, architecture="MixtralForCausalLM")
    experts = sum(l.experts.w_in.numel() + l.experts.w_out.numel() for l in model.moe_layers()) * 4
    layer = experts // len(model.moe_layers())
    del model
    budget = (layer + 8 * 64) / 1e9  # one slot per layer (64-byte aligned)
    whole, streamed = _load_peak(tmp_path, 0), _load_peak(tmp_path, budget)
    assert whole > experts  # the in-memory load holds every expert
    assert streamed < whole - 0.6 * experts, (streamed, whole, experts)
    assert streamed < 5 * layer + budget * 1e9 + 8e6, (streamed, layer)  # the rest is ~4 MB


def test_max_memory_gives_the_same_cache_streamed_and_in_memory(tmp_path):
    from moekit.offload.budget import kv_bytes, resident_bytes

    folder = _hf_folder(tmp_path, "qwen3_moe")
    ref = from_pretrained(folder, dtype=torch.bfloat16)
    total = (resident_bytes(ref) + kv_bytes(ref.cfg, 3, torch.bfloat16) + 2.5 * _one_slot(ref) * 1e9) / 1e9
    cfg = OffloadConfig(max_memory_gb=total, kv_sequences=3, prefetch=False)
    streamed = from_pretrained(folder, dtype=torch.bfloat16, offload=cfg)
    rt = offload_model(ref, cfg)
    try:
        assert streamed.offload.cfg.cache_gb == pytest.approx(rt.cfg.cache_gb)
        assert {c.capacity for c in rt.caches.values()} == {c.capacity for c in streamed.offload.caches.values()} == {2}
    finally:
        rt.close()
        streamed.offload.close()


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v4"])
def test_experts_with_biases_and_clamped_swiglus_stream_bit_identically(tmp_path, arch):
    """GPT-OSS (expert biases, clamped SwiGLU) and DeepSeek-V4 (limited SwiGLU): float, int8 at
    load and an int8 `moekit quantize` folder stream into the store with the biases beside each
    expert's matrices."""
    torch.manual_seed(0)
    folder = tmp_path / arch
    hf_tiny.build(arch).save_pretrained(folder)
    ref = from_pretrained(folder, dtype=torch.float32)
    budget = _one_slot(ref) + 1e-9  # + 1 byte: the GB value rounds back down otherwise
    prompts = [torch.randint(0, hf_tiny.VOCAB, (n,)).tolist() for n in (9, 5)]
    _check_stream(ref, from_pretrained(folder, dtype=torch.float32, offload=OffloadConfig(cache_gb=budget)), prompts)
    qcfg = QuantConfig(bits=8)
    quantize_model(ref, qcfg)
    budget = _one_slot(ref) + 1e-9
    _check_stream(ref, from_pretrained(folder, dtype=torch.float32, quantize=qcfg,
                                       offload=OffloadConfig(cache_gb=budget)), prompts)
    save_quantized(ref, tmp_path / "q")
    _check_stream(ref, from_pretrained(tmp_path / "q", offload=OffloadConfig(cache_gb=budget, store="ram")), prompts)
