"""Quantized twins against float layers holding the same (dequantized) weights: every expert path
of the MoE layer, the whole model for every scope, and the coverage report."""

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.config import ModelConfig
from moekit.model import MoETransformer
from moekit.quant import kernels
from moekit.quant.convert import QuantConfig, quantize_model
from moekit.quant.modules import QuantizedExperts, QuantizedLinear, QuantizedMLP

from reference import reference_moe

D, F = 64, 32  # both multiples of the int4 group, so every projection quantizes
LAYERS = {
    "softmax-top2": dict(router="softmax", num_experts=8, top_k=2),
    "sigmoid-groups": dict(router="sigmoid", num_experts=8, top_k=2, num_groups=4, topk_groups=2,
                           routed_scaling_factor=2.5),
    "expert-choice": dict(router="expert_choice", num_experts=8, top_k=2),
    "fine-shared-gated": dict(router="softmax", num_experts=16, top_k=4, num_shared_experts=2, shared_expert_gate=True),
    "gelu-cf0.5": dict(router="softmax", num_experts=4, top_k=2, activation="gelu", capacity_factor=0.5),
    # GPT-OSS's experts (biases, clamped SwiGLU) and DeepSeek-V4's (limited SwiGLU), with limits
    # small enough that the clamps bind on these activations
    "gpt-oss": dict(router="softmax", num_experts=8, top_k=2, router_bias=True, expert_proj_bias=True,
                    activation="clamped_swiglu", swiglu_limit=0.5),
    "v4-limited": dict(router="sigmoid", num_experts=8, top_k=2, activation="limited_swiglu", swiglu_limit=0.5),
}
BITS = [8, 4]
needs_int4 = pytest.mark.skipif(not kernels.int4_available(), reason="this torch lacks the CPU int4 kernel")


def _layer(case: str, seed: int) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(d_model=D, d_expert=F, **LAYERS[case]))
    layer.reset_parameters(std=0.3, out_std=0.3)  # a spread-out router, so choices differ per token
    if layer.experts.has_bias:  # zeros after reset: random, so a dropped bias shows
        with torch.no_grad():
            layer.experts.b_in.normal_(std=0.3)
            layer.experts.b_out.normal_(std=0.3)
    return layer.eval()


def quantized_and_dequantized(case: str, bits: int, seed: int = 0) -> tuple[MoELayer, MoELayer]:
    """The layer with quantized experts, and a float twin whose experts hold the dequantized weights."""
    q, fp = _layer(case, seed), _layer(case, seed)
    q.experts = QuantizedExperts.from_float(q.experts, bits, group_size=32)
    with torch.no_grad():
        fp.experts.w_in.copy_(q.experts.w_in.dequantize())
        fp.experts.w_out.copy_(q.experts.w_out.dequantize())
    return q, fp


def _close(got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=10 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped", "decode", "loop"])
@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=needs_int4)])
@pytest.mark.parametrize("case", LAYERS)
def test_quantized_layer_equals_dequantized_float_layer(case, bits, impl, dtype):
    q, fp = quantized_and_dequantized(case, bits, seed=len(case))
    q.impl = impl
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(bits)).to(dtype)
    with torch.no_grad():
        got = q(x)
        want = reference_moe(fp, x.float())[0] if dtype == torch.float32 else fp(x)
    assert got.dtype == dtype
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=needs_int4)])
@pytest.mark.parametrize("case", ["softmax-top2", "sigmoid-groups", "fine-shared-gated", "gpt-oss", "v4-limited"])
def test_quantized_single_token_decode(case, bits, dtype):
    """Batch-1 decode skips the dispatch plan (``single_token``); it must agree too."""
    q, fp = quantized_and_dequantized(case, bits)
    for seed in range(3):
        x = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
        with torch.no_grad():
            _close(q(x), fp(x) if dtype != torch.float32 else reference_moe(fp, x)[0], dtype)


def test_quantized_layer_really_differs_from_the_float_one():
    """The comparisons above are against dequantized weights; against the original float
    weights int4 must show its (small, nonzero) error, or nothing was quantized."""
    for bits in [8] + ([4] if kernels.int4_available() else []):
        q, _ = quantized_and_dequantized("softmax-top2", bits)
        orig = _layer("softmax-top2", 0)
        x = torch.randn(2, 9, D)
        with torch.no_grad():
            err = (q(x) - orig(x)).abs().max() / orig(x).abs().max()
        assert 0 < err < (0.02 if bits == 8 else 0.2)


def _tiny_model(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=D, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32, d_ff=96,
                       first_dense_layers=1, moe=MoEConfig(d_model=D, d_expert=F, num_experts=4, top_k=2, **moe))


def _model(seed: int, **moe) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(_tiny_model(**moe)).eval()


def _dequantized_copy(qmodel: MoETransformer, seed: int, **moe) -> MoETransformer:
    """A float model whose every quantized matrix is replaced by its dequantized values."""
    fp = _model(seed, **moe)
    state = fp.state_dict()
    with torch.no_grad():
        for name, module in qmodel.named_modules():
            if isinstance(module, QuantizedExperts):
                state[f"{name}.w_in"].copy_(module.w_in.dequantize())
                state[f"{name}.w_out"].copy_(module.w_out.dequantize())
            elif isinstance(module, QuantizedLinear):
                state[f"{name}.weight"].copy_(module.weight_q.dequantize())
    return fp


ALL = ("experts", "shared", "attention", "dense")


@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=needs_int4)])
@pytest.mark.parametrize("scope", [("experts",), ALL])
def test_quantized_model_equals_dequantized_model_and_leaves_nothing_float(bits, scope):
    moe = dict(num_shared_experts=1)
    qmodel = _model(3, **moe)
    cov = quantize_model(qmodel, QuantConfig(bits=bits, group_size=32, scope=scope))
    assert cov.float_in_scope == []
    kinds = {type(m) for m in qmodel.modules()}
    assert QuantizedExperts in kinds and (QuantizedMLP in kinds) == ("dense" in scope)
    for layer in qmodel.moe_layers():  # no expert silently left in float
        assert isinstance(layer.experts, QuantizedExperts)
        assert not any(t.is_floating_point() and t.dim() == 3 for t in layer.experts.state_dict().values())
    fp = _dequantized_copy(qmodel, 3, **moe)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        _close(qmodel(ids).logits, fp(ids).logits, torch.float32)
        for impl in ("loop", "grouped"):
            for layer in qmodel.moe_layers():
                layer.impl = impl
            _close(qmodel(ids).logits, fp(ids).logits, torch.float32)
    rows = {r["kind"]: r for r in cov.rows()}
    for kind in ("experts", "attention", "dense", "shared"):
        in_scope = kind in scope
        assert (rows[kind]["quantized_params"] == rows[kind]["params"]) == in_scope, kind
        assert (rows[kind]["bytes_after"] < rows[kind]["bytes_before"] / (3 if bits == 8 else 4)) == in_scope, kind
    assert rows["embedding"]["bytes_after"] == rows["embedding"]["bytes_before"]  # kept float on purpose


def test_coverage_names_a_float_matrix_left_in_scope():
    """A module the swap does not know (here: an expert weight smuggled in as a plain tensor)
    is reported by name, never skipped silently."""
    model = _model(0)
    cov = quantize_model(model, QuantConfig(bits=8))
    layer = model.moe_layers()[0]
    layer.experts.register_buffer("w_extra", torch.randn(4, 8, D))
    from moekit.quant.convert import float_left

    assert float_left(model, ("experts",)) == ["blocks.1.ffn.experts.w_extra"]
    assert cov.float_in_scope == []


def test_quant_config_validation():
    with pytest.raises(ValueError, match="bits must be 8 or 4; got 3"):
        QuantConfig(bits=3)
    with pytest.raises(ValueError, match="group_size must be one of 32, 64, 128, 256; got 48"):
        QuantConfig(bits=4, group_size=48)
    with pytest.raises(ValueError, match="scope must be a non-empty subset"):
        QuantConfig(scope=("experts", "routers"))
    assert QuantConfig.from_dict(QuantConfig(bits=4, scope=ALL).to_dict()) == QuantConfig(bits=4, scope=ALL)


@pytest.mark.parametrize("impl", ["grouped", "decode", "loop"])
@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=needs_int4)])
def test_quantized_provider_rows_and_get_at_the_seam(bits, impl):
    """The weights-provider seam (layers/weights.py): a non-local dispatcher calls ``rows`` on
    dispatched rows; it equals the float provider's reference loop on the dequantized weights,
    and ``get`` hands out exactly those dequantized matrices."""
    from moekit.layers.experts import expert_rows

    q, fp = quantized_and_dequantized("softmax-top2", bits)
    assert q.experts.plain is False and fp.experts.plain is True
    g = torch.Generator().manual_seed(11)
    counts = torch.tensor([3, 0, 2, 5, 1, 0, 4, 2])
    x_MD, w_M = torch.randn(int(counts.sum()), D, generator=g), torch.rand(int(counts.sum()), generator=g)
    with torch.no_grad():
        _close(q.experts.rows(x_MD, counts, w_M, impl), expert_rows(fp.experts, x_MD, counts, w_M, "loop"), torch.float32)
    for (a, b), (c, d) in zip(q.experts.get([2, 5], torch.float32), fp.experts.get([2, 5], torch.float32)):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=needs_int4)])
def test_expert_biases_stay_float_by_design_and_the_activation_is_kept(bits):
    """GPT-OSS experts: the twin keeps the biases (float, under the float names) and the clamped
    SwiGLU's limit and alpha; the coverage lists the biases as float by design, not as left over."""
    q, _ = quantized_and_dequantized("gpt-oss", bits)
    orig = _layer("gpt-oss", 0).experts
    assert q.experts.has_bias and q.experts.act_args == orig.act_args == (0.5, 1.702)
    assert torch.equal(q.experts.b_in, orig.b_in) and torch.equal(q.experts.b_out, orig.b_out)
    moe = MoEConfig(d_model=D, d_expert=F, num_experts=4, top_k=2, router_bias=True, expert_proj_bias=True,
                    activation="clamped_swiglu")
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=D, n_layers=2, n_heads=4, d_ff=48, moe=moe))
    cov = quantize_model(model, QuantConfig(bits=bits, group_size=32, scope=("attention", "experts")))
    assert cov.float_in_scope == []
    assert cov.float_by_design == [f"blocks.{i}.ffn.experts.{b}" for i in (0, 1) for b in ("b_in", "b_out")]
    assert "kept float by design: 4 expert bias tensor(s)" in cov.format()
    assert all(isinstance(l.experts, QuantizedExperts) for l in model.moe_layers())
