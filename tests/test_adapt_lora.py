"""LoRA on experts, attention and FFNs: the grouped and decode paths equal a plain per-expert
loop with W_e + s * B_e A_e (forward and gradients, fp32 and bf16, empty experts included);
targets that match nothing or half an FFN are errors; merging keeps the logits; expert
dropout runs in training only, deterministically."""

import pytest
import torch
import torch.nn.functional as F

from moekit import MoETransformer
from moekit.adapt.lora import (LoRAConfig, LoRALinear, LoRAMLP, apply_expert_dropout, apply_lora, is_lora_parameter,
                               merge_lora, resolve_targets)
from moekit.adapt.lora_experts import LoRAExperts
from moekit.config import MoEConfig, ModelConfig
from moekit.errors import UsageError
from moekit.layers.dispatch import plan_dispatch
from moekit.layers.experts import Experts
from moekit.layers.mlp import activate
from moekit.layers.moe import MoELayer

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def assert_near(actual, expected, dtype):
    """fp32: elementwise; bf16 (against an fp32 reference): the largest error within 2 % of
    the largest value, the scale at which bf16's 8-bit mantissa rounds sums of ~20 terms."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])
    else:
        err = (actual.float() - expected.float()).abs().max()
        assert err <= 0.02 * expected.float().abs().max() + 1e-3, (float(err), float(expected.abs().max()))


def model_cfg(**over) -> ModelConfig:
    moe = dict(d_model=32, d_expert=16, num_experts=6, top_k=2, router="softmax", router_jitter=0.0,
               bias_update_rate=0.0, num_shared_experts=1)
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                first_dense_layers=1, moe=MoEConfig(**moe))
    base.update(over)
    return ModelConfig(**base)


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """B = 0 at init would make every test pass trivially: give every adapter random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_lora_parameter(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def reference_experts(base_w_in, base_w_out, lora, scale, activation, x_MD, counts):
    """Per-expert loop with the merged matrix W_e + s * B_e A_e (independent of LoRAExperts)."""
    outs = []
    for e, x_e in enumerate(torch.split(x_MD, counts.tolist())):
        w_in = base_w_in[e].float() + scale * lora["w_in_lora_B"][e].float() @ lora["w_in_lora_A"][e].float()
        w_out = base_w_out[e].float() + scale * lora["w_out_lora_B"][e].float() @ lora["w_out_lora_A"][e].float()
        outs.append(activate(x_e @ w_in.to(x_e.dtype).t(), activation) @ w_out.to(x_e.dtype).t())
    return torch.cat(outs)


def lora_experts(E=5, D=24, F_=16, r=4, activation="swiglu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = Experts(E, D, F_, activation)
    base.reset_parameters(0.2, 0.2)
    base.requires_grad_(False)
    le = LoRAExperts(base, rank=r, alpha=8.0)
    randomize_adapters(le, seed + 1)
    return le.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped", "decode", "loop"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_rows_equal_the_merged_loop_forward_and_grad(dtype, impl, activation):
    le = lora_experts(activation=activation, dtype=dtype)
    counts = torch.tensor([3, 0, 5, 1, 0])  # empty experts 1 and 4
    M = int(counts.sum())
    x = torch.randn(M, le.d_model, dtype=dtype, requires_grad=True)
    w = torch.rand(M)
    y = le.rows(x, counts, w, impl)
    adapters = {n: p for n, p in le.named_parameters() if is_lora_parameter(n)}
    # the reference in fp32 from the same (rounded) values
    ref_adapters = {n: p.detach().float().clone().requires_grad_() for n, p in adapters.items()}
    x_ref = x.detach().float().clone().requires_grad_()
    ref = reference_experts(le.w_in.float(), le.w_out.float(), ref_adapters, le.scale, activation, x_ref,
                            counts) * w[:, None]
    assert y.dtype == torch.float32 and y.shape == (M, le.d_model)
    assert_near(y, ref, dtype)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert_near(x.grad, x_ref.grad, dtype)
    for n, p in adapters.items():
        assert_near(p.grad, ref_adapters[n].grad, dtype)
        assert p.grad[1].abs().sum() == 0 and p.grad[4].abs().sum() == 0  # empty experts: zero gradient
        assert p.grad[0].abs().sum() > 0


def test_no_rows_at_all_still_gives_every_adapter_a_gradient():
    le = lora_experts()
    x = torch.randn(0, le.d_model, requires_grad=True)
    y = le.rows(x, torch.zeros(5, dtype=torch.long), torch.rand(0))
    (y.sum() + x.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for n, p in le.named_parameters() if is_lora_parameter(n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_with_lora_experts_grouped_and_single_token_decode_match_loop(dtype):
    torch.manual_seed(3)
    cfg = MoEConfig(d_model=24, d_expert=16, num_experts=6, top_k=2, router="softmax", router_jitter=0.0,
                    bias_update_rate=0.0)
    layer = MoELayer(cfg).eval()
    layer.experts = LoRAExperts(layer.experts, rank=3, alpha=6.0)
    randomize_adapters(layer)
    layer.to(dtype)
    x = torch.randn(2, 9, 24, dtype=dtype)
    outs = {}
    for impl in ("grouped", "decode", "loop"):
        layer.impl = impl
        outs[impl] = layer(x)
    torch.testing.assert_close(outs["grouped"], outs["loop"], **TOL[dtype])
    torch.testing.assert_close(outs["decode"], outs["loop"], **TOL[dtype])
    layer.impl = "auto"  # one token: the single-token path, no dispatch plan
    one = x[:1, :1]
    r = layer.router(one.reshape(1, -1))
    expected = sum(r.weights[0, k].float() * layer.experts.expert_forward(int(r.ids[0, k]), one.reshape(1, -1)).float()
                   for k in range(cfg.top_k))
    torch.testing.assert_close(layer(one).reshape(1, -1).float(), expected.to(dtype).float(), **TOL[dtype])


def test_only_the_routed_experts_adapters_are_read_in_single_token_decode():
    le = lora_experts()
    read = []
    orig = le._low_rank
    le._low_rank = lambda name, e, x: read.append(e) or orig(name, e, x)
    le.single_token(torch.randn(1, le.d_model), torch.tensor([[3, 0]]), torch.rand(1, 2))
    assert sorted(set(read)) == [0, 3]


def test_lora_linear_and_mlp_equal_merged_weights_forward_and_grad():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 7, bias=True).requires_grad_(False)
    ll = LoRALinear(lin, rank=3, alpha=5.0)
    randomize_adapters(ll)
    x = torch.randn(4, 12, requires_grad=True)
    ref_w = lin.weight + (5.0 / 3) * ll.lora_B @ ll.lora_A
    torch.testing.assert_close(ll(x), F.linear(x, ref_w, lin.bias))
    ll(x).square().sum().backward()
    assert ll.lora_A.grad is not None and ll.lora_B.grad.abs().sum() > 0 and lin.weight.grad is None
    plain = ll.to_plain()
    torch.testing.assert_close(plain(x), ll(x))


def test_apply_lora_keeps_outputs_at_init_and_base_names():
    torch.manual_seed(0)
    model = MoETransformer(model_cfg()).eval()
    ids = torch.randint(0, 97, (2, 16))
    before = model(ids).logits
    names = {n for n, _ in model.named_parameters()}
    report = apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    after_names = {n for n, _ in model.named_parameters()}
    assert names <= after_names and all(is_lora_parameter(n) for n in after_names - names)
    torch.testing.assert_close(model(ids).logits, before)  # B = 0: the same function
    assert {k: len(v) for k, v in report.matrices.items()} == {"attention": 12, "dense": 2, "shared": 4, "experts": 4}
    assert isinstance(model.blocks[0].ffn, LoRAMLP) and isinstance(model.blocks[1].ffn.experts, LoRAExperts)
    assert "LoRA rank 4 on attention 12 matrices" in report.line()


@pytest.mark.parametrize("targets", [["all"], ["experts"], ["shared", "attention"], ["dense"], ["blocks.2.*"]])
def test_merge_gives_the_adapted_models_logits(targets):
    torch.manual_seed(0)
    model = MoETransformer(model_cfg()).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=targets))
    randomize_adapters(model)
    ids = torch.randint(0, 97, (2, 16))
    adapted = model(ids).logits
    plain_names = {n for n, _ in MoETransformer(model_cfg()).named_parameters()}
    assert merge_lora(model) > 0
    assert {n for n, _ in model.named_parameters()} == plain_names
    assert not any(isinstance(m, (LoRALinear, LoRAMLP, LoRAExperts)) for m in model.modules())
    merged = model(ids).logits
    assert (adapted - MoETransformer(model_cfg()).eval()(ids).logits).abs().max() > 1e-2  # the adapters mattered
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    # the merged model is a plain model: its state dict loads into a fresh one
    fresh = MoETransformer(model_cfg()).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(ids).logits, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("targets, message", [
    (["experts"], "no experts matrices"),
    (["nothing_like_this"], "matches no adaptable matrix"),
    (["experts.w_in"], "only part of blocks.1.ffn.experts's expert weights"),
    (["blocks.0.ffn.w_out.*"], "only part of blocks.0.ffn's FFN matrices"),
])
def test_bad_targets_are_one_line_errors(targets, message):
    cfg = model_cfg(moe=None, first_dense_layers=0) if targets == ["experts"] else model_cfg()
    model = MoETransformer(cfg)
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as e:
        resolve_targets(model, targets)
    assert "\n" not in str(e.value)


def test_expert_dropout_only_in_training_and_seeded():
    torch.manual_seed(0)
    model = MoETransformer(model_cfg())
    ids = torch.randint(0, 97, (2, 16))
    model.eval()
    base = model(ids).logits
    assert apply_expert_dropout(model, 0.4) == 2
    torch.testing.assert_close(model(ids).logits, base)  # eval: off
    model.train()
    torch.manual_seed(5)
    a = model(ids).logits
    torch.manual_seed(5)
    b = model(ids).logits
    c = model(ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, base)
    model.eval()
    torch.testing.assert_close(model(ids).logits, base)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in MoETransformer(model_cfg()).named_parameters()}


def test_lora_config_validation():
    from moekit.errors import ConfigError

    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(targets=[]), dict(targets="experts")):
        with pytest.raises(ConfigError):
            LoRAConfig(**bad)


TWIN_EXPERTS = {  # GPT-OSS's experts (biases, clamped SwiGLU) and DeepSeek-V4's (limited SwiGLU), limits that bind
    "gpt-oss": dict(router_bias=True, expert_proj_bias=True, activation="clamped_swiglu", swiglu_limit=0.5),
    "v4": dict(activation="limited_swiglu", swiglu_limit=0.5),
}


def _twin_model(kind: str) -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2, **TWIN_EXPERTS[kind])
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, moe=moe)).eval()
    with torch.no_grad():  # biases start at zero: random, so a dropped one shows
        for layer in model.moe_layers():
            for b in ("b_in", "b_out") if layer.experts.has_bias else ():
                getattr(layer.experts, b).normal_(std=0.3)
    return model


@pytest.mark.parametrize("kind", list(TWIN_EXPERTS))
def test_lora_on_experts_with_biases_and_clamped_swiglus(kind):
    """The adapters leave the biases and the activation's arguments alone: B = 0 keeps the
    function, the factored paths equal the merged loop (forward and the adapters' gradients),
    merging gives the adapted logits in plain experts with the same biases; expert dropout applies."""
    model = _twin_model(kind)
    ids = torch.randint(0, 64, (2, 12))
    before = model(ids).logits
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=["experts"]))
    le = model.moe_layers()[0].experts
    assert isinstance(le, LoRAExperts) and le.act_args != () and le.has_bias == (kind == "gpt-oss")
    torch.testing.assert_close(model(ids).logits, before)
    randomize_adapters(model)
    model.train()  # the trainer's mode; no dropout is configured
    outs = {}
    for impl in ("loop", "grouped", "decode"):
        for layer in model.moe_layers():
            layer.impl = impl
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        outs[impl] = logits.detach(), le.w_in_lora_B.grad.clone()
    for impl in ("grouped", "decode"):
        torch.testing.assert_close(outs[impl][0], outs["loop"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(outs[impl][1], outs["loop"][1], atol=1e-5, rtol=1e-4)
    model.eval()
    adapted = model(ids).logits
    assert (adapted - before).abs().max() > 1e-3
    merge_lora(model)
    plain = model.moe_layers()[0].experts
    assert type(plain) is Experts and plain.act_args == le.act_args and plain.has_bias == le.has_bias
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-4, rtol=1e-4)
    assert apply_expert_dropout(model, 0.1) == 2


def test_peft_export_refuses_adapters_on_experts_with_biases_or_clamped_swiglus(tmp_path):
    from moekit.adapt.lora_peft import export_peft

    model = _twin_model("gpt-oss")
    cfg = LoRAConfig(rank=4, targets=["experts"])
    apply_lora(model, cfg)
    with pytest.raises(UsageError, match=r"cannot export adapters of experts with biases or "
                                         r"activation='clamped_swiglu' .*merge them instead"):
        export_peft(model, cfg, tmp_path / "peft", architecture="GptOssForCausalLM")
    assert not (tmp_path / "peft").exists()


def test_expert_parallelism_refusal_names_what_the_experts_have():
    from moekit.layers.weights import require_plain_ffn

    with pytest.raises(ValueError, match=r"expert parallelism does not support experts with projection biases "
                                         r"\(b_in, b_out\) and activation='clamped_swiglu' with arguments "
                                         r"\(0.5, 1.702\) \(GPT-OSS's experts\)"):
        require_plain_ffn(_twin_model("gpt-oss").moe_layers()[0].experts, "expert parallelism")
    with pytest.raises(ValueError, match=r"activation='limited_swiglu' with arguments \(0.5,\) \(DeepSeek-V4's"):
        require_plain_ffn(_twin_model("v4").moe_layers()[0].experts, "expert parallelism")


def test_freezing_half_of_an_expert_layers_adapters_is_an_error():
    from moekit.training.freeze import select_trainable

    model = MoETransformer(model_cfg())
    apply_lora(model, LoRAConfig(rank=2, targets=["experts"]))
    assert len(select_trainable(model, "lora")) == 8  # 2 MoE layers x 2 matrices x (A, B)
    assert len(select_trainable(model, "lora", ["blocks.1.*"])) == 4  # a whole layer frozen: fine
    with pytest.raises(UsageError, match=r"only part of blocks\.1's LoRA adapters"):
        select_trainable(model, "lora", [r"experts\.w_in_lora"])
