"""Offloaded experts: generation bit-identical to the in-memory model, for every family,
float and int8/int4 experts, every policy, with and without prefetch, on budgets that force
evictions; the counters; the budget's bad input."""

import copy

import hf_tiny
import pytest
import torch
from offload_helpers import generate_with_logits as _generate
from offload_helpers import same_run as _same

from moekit.errors import UsageError
from moekit.interop import from_pretrained
from moekit.offload.runtime import OffloadConfig, offload_model
from moekit.offload.store import ExpertLayout
from moekit.quant import kernels
from moekit.quant.convert import QuantConfig, quantize_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder per architecture for the whole module (building and saving costs more than a test)."""
    return tmp_path_factory.mktemp("hf")


# GPT-OSS and DeepSeek-V4 with expert widths F = 32 (hf_tiny's are 16), which int4's group divides
WIDE = {"gpt_oss32": ("gpt_oss", "intermediate_size"), "deepseek_v432": ("deepseek_v4", "moe_intermediate_size")}
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "llama4", "gpt_oss",
            "deepseek_v4"]


def _olmoe_int4_sized():
    """hf_tiny's OLMoE with expert widths int4's group size divides (8 experts, top-3)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(**hf_tiny._common(intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
                                        num_experts=8, num_experts_per_tok=3))
    return hf_tiny.randomize(OlmoeForCausalLM(cfg))


def _model(tmp_path, arch: str, bits: int | None = None):
    folder = tmp_path / arch
    if not folder.exists():
        torch.manual_seed(0)
        if arch in WIDE:
            hf_tiny.build(WIDE[arch][0], **{WIDE[arch][1]: 32}).save_pretrained(folder)
        else:
            (_olmoe_int4_sized() if arch == "olmoe32" else hf_tiny.build(arch)).save_pretrained(folder)
    model = from_pretrained(folder, dtype=torch.float32)
    if bits:
        quantize_model(model, QuantConfig(bits=bits, group_size=32 if bits == 4 else 64))
    return model.eval()


def _slot_bytes(model) -> int:
    return ExpertLayout.of(model.moe_layers()[0].experts.state_dict()).slot_bytes




def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _offloaded(model, slots: int, **kw):
    m = copy.deepcopy(model)
    n_layers = len(m.moe_layers())
    gb = (slots * n_layers * _slot_bytes(m) + 1) / 1e9  # + 1 byte: the GB value rounds back down otherwise
    rt = offload_model(m, OffloadConfig(cache_gb=gb, **kw))
    assert all(c.capacity == slots for c in rt.caches.values())
    return m, rt


@pytest.mark.parametrize("arch", FAMILIES)
def test_offloaded_generation_is_bit_identical_for_every_family(folders, arch):
    model = _model(folders, arch)
    prompts = [torch.randint(0, hf_tiny.VOCAB, (n,)).tolist() for n in (9, 5)]
    ids = torch.randint(0, hf_tiny.VOCAB, (2, 12))
    ref_tokens, ref_logits = _generate(model, prompts), _logits(model, ids)
    off, rt = _offloaded(model, slots=1, prefetch=False)
    try:
        assert torch.equal(_logits(off, ids), ref_logits)
        assert _same(_generate(off, prompts), ref_tokens)
        s = rt.stats
        assert s.misses > 0 and s.evictions > 0 and s.hits + s.misses > 0
    finally:
        rt.close()


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_bit_identical_for_float_int8_int4_every_policy_with_and_without_prefetch(folders, bits, policy, prefetch):
    model = _model(folders, "olmoe32", bits)  # 8 experts, top-3: a 2-slot cache must evict
    prompts = [torch.randint(0, hf_tiny.VOCAB, (n,)).tolist() for n in (11, 4)]
    ref = _generate(model, prompts, n=10)
    off, rt = _offloaded(model, slots=2, policy=policy, prefetch=prefetch)
    try:
        assert _same(_generate(off, prompts, n=10), ref)
        rt.drain()
        s = rt.stats
        assert s.misses > 0 and s.evictions > 0
        assert (s.prefetch_issued > 0) == prefetch and (s.prefetch_useful > 0) == prefetch
        assert all(c.allocated_bytes <= c.capacity * c.layout.slot_bytes for c in rt.caches.values())
    finally:
        rt.close()


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("impl", ["grouped", "decode", "loop"])
def test_every_expert_impl_and_a_long_prefill_are_bit_identical(folders, bits, impl):
    """Prompts over 64 tokens take the grouped (fused) path in memory; the offloaded provider
    runs it one expert at a time and must add up to the same numbers."""
    model = _model(folders, "mixtral", bits)
    for layer in model.moe_layers():
        layer.impl = impl
    ids = torch.randint(0, hf_tiny.VOCAB, (2, 40))
    ref = _logits(model, ids)
    off, rt = _offloaded(model, slots=1, prefetch=True)
    try:
        assert torch.equal(_logits(off, ids), ref)
    finally:
        rt.close()


def test_ram_store_and_compute_on_miss_are_bit_identical(folders):
    model = _model(folders, "qwen3_moe")
    prompts = [torch.randint(0, hf_tiny.VOCAB, (7,)).tolist()]
    ref = _generate(model, prompts)
    for kw in (dict(store="ram"), dict(on_miss="compute"), dict(store="ram", on_miss="compute", prefetch=False)):
        off, rt = _offloaded(model, slots=2, **kw)
        try:
            assert _same(_generate(off, prompts), ref), kw
            if kw.get("on_miss") == "compute":
                assert rt.stats.computed_on_miss > 0
            if kw.get("prefetch") is False:  # only prefetch evicts when misses are computed in place
                assert rt.stats.evictions == 0
        finally:
            rt.close()


def test_budget_smaller_than_one_expert_per_layer_is_one_clear_error(folders):
    model = _model(folders, "mixtral")
    need = 2 * _slot_bytes(model) / 1e9
    with pytest.raises(UsageError, match=r"--expert-cache-gb .* holds no expert per MoE layer.*give at least"):
        offload_model(model, OffloadConfig(cache_gb=need / 4))


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("arch", list(WIDE))
def test_experts_with_biases_and_clamped_swiglus_offload_bit_identically(folders, arch, bits):
    """GPT-OSS (expert biases, clamped SwiGLU) and DeepSeek-V4 (limited SwiGLU), float, int8 and
    int4: the store holds each expert's biases with its matrices, the slot's view keeps the
    activation's arguments; generation and a long prefill through every impl match memory."""
    if bits == 4 and not kernels.int4_available():
        pytest.skip("this torch lacks the CPU int4 kernel")
    model = _model(folders, arch, bits)
    parts = {p.name for p in ExpertLayout.of(model.moe_layers()[0].experts.state_dict()).parts}
    assert {"b_in", "b_out"} <= parts if arch == "gpt_oss32" else not parts & {"b_in", "b_out"}
    prompts = [torch.randint(0, hf_tiny.VOCAB, (n,)).tolist() for n in (9, 5)]
    ref = _generate(model, prompts)
    ids = torch.randint(0, hf_tiny.VOCAB, (2, 40))
    off, rt = _offloaded(model, slots=1, prefetch=True)
    try:
        assert _same(_generate(off, prompts), ref)
        for impl in ("grouped", "decode", "loop"):
            for layer, off_layer in zip(model.moe_layers(), off.moe_layers()):
                layer.impl = off_layer.impl = impl
            assert torch.equal(_logits(off, ids), _logits(model, ids)), impl
        assert rt.stats.misses > 0 and rt.stats.evictions > 0
    finally:
        rt.close()