"""The fast expert paths (grouped matmul with its custom backward, the decode path) against the
per-expert reference loop: every router, capacity on and off, shared experts, fp32 and bf16,
forward and gradients (input and every weight); plus autocast, torch.compile and the
grouped_mm-free fallback. "grouped" and "blocked" are the grouped node's two schedules (one
grouped_mm per projection; one block per expert), both forced here whatever this machine picks."""

import dataclasses

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.layers import grouped_mm
from moekit.layers.dispatch import DispatchPlan
from moekit.layers.experts import Experts

from reference import reference_moe
from test_moe_layer import BF16_LIMIT, CASES, D, assert_close_scaled, make_layer, run_both

FAST = ["grouped", "blocked", "decode"]


def use(layer, impl, monkeypatch):
    """Set the layer's expert impl; "grouped"/"blocked" force that schedule of the grouped node."""
    if impl in grouped_mm.SCHEDULES:
        monkeypatch.setattr(grouped_mm, "pick_schedule", lambda _x, _widths, s=impl: s)
    layer.impl = "grouped" if impl in grouped_mm.SCHEDULES else impl


FP32_CASES = [(case, None) for case in CASES] + [
    (case, 0.5) for case in ["softmax-top2", "sigmoid-groups", "expert-choice", "fine-shared-gated"]
]


@pytest.mark.parametrize("case,capacity", FP32_CASES, ids=[f"{c}-cf{cf}" for c, cf in FP32_CASES])
@pytest.mark.parametrize("impl", FAST)
def test_fast_path_matches_reference_fp32(impl, case, capacity, monkeypatch):
    layer = make_layer(case, capacity)
    use(layer, impl, monkeypatch)
    y1, y2, g1, g2 = run_both(layer, torch.randn(2, 12, D))
    assert_close_scaled(y1, y2)
    for a, b in zip(g1, g2):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        assert_close_scaled(a, b)


@pytest.mark.parametrize("case", ["softmax-top2", "sigmoid-groups", "expert-choice", "fine-shared-gated", "gelu",
                                  "gpt-oss"])
@pytest.mark.parametrize("impl", FAST)
def test_fast_path_matches_reference_bf16(impl, case, monkeypatch):
    layer = make_layer(case, 1.0 if case == "softmax-top2" else None, **BF16_LIMIT.get(case, {}))
    use(layer, impl, monkeypatch)
    y1, y2, g1, g2 = run_both(layer, torch.randn(2, 12, D).bfloat16())
    assert y1.dtype == torch.bfloat16
    # Relative to the largest entry: the fused path rounds a*w in bf16 before the down
    # projection, the reference weights fp32 outputs; both are as far from an fp32 oracle.
    assert_close_scaled(y1.float(), y2.float(), tol=2e-2)
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype
        assert_close_scaled(a.float(), b.float(), tol=2e-2)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu", "clamped_swiglu", "limited_swiglu"])
def test_grouped_equals_loop_with_empty_experts(activation, dtype, bias, monkeypatch):
    """Experts level, a hand-made plan: uneven slices with empty ones, tokens repeated across
    experts and one token with no slot. The grouped path, its loop fallback and autograd
    through the plain loop agree on outputs and all gradients (input, routing weights, expert
    weights and biases); idle experts get zero gradients. Both schedules of the grouped node
    run here (one grouped_mm per projection, and one block per expert), whichever this machine
    picks. The clamped SwiGLUs (GPT-OSS, DeepSeek-V4) clamp at 0.5 in fp32, where the
    activations cross it; bf16 takes a limit they do not reach (see BF16_LIMIT)."""
    limit = 0.5 if dtype == torch.float32 else 50.0
    act_args = {"clamped_swiglu": (limit, 1.702), "limited_swiglu": (limit,)}.get(activation, ())
    experts = Experts(6, 16, 16, activation, bias=bias, act_args=act_args).to(dtype)  # widths grouped_mm takes
    experts.reset_parameters(0.3, 0.3)
    if bias:
        with torch.no_grad():
            experts.b_in.normal_(std=0.3), experts.b_out.normal_(std=0.3)
    counts = torch.tensor([5, 0, 9, 1, 0, 7])
    T = 10
    token_ids = torch.cat([torch.randperm(T - 1)[:n] for n in counts.tolist()])  # token T-1 unused
    plan = DispatchPlan(token_ids=token_ids, weights=torch.rand(len(token_ids)), counts=counts,
                        routed_counts=counts, num_dropped=0, num_routed=len(token_ids), capacity=None)
    x = torch.randn(T, 16, dtype=dtype)
    d_out = torch.randn(T, 16)
    results = []
    # Blocked with budgets of 1 byte (one expert per block), 7 slots' rows (blocks of 1-3
    # experts) and the default (every expert in one block at this size).
    row = 2 * 16 * experts.w_in.element_size()  # max(H, D) elements: H = 32 for swiglu
    runs = [("loop", None, 1), ("grouped", "grouped", 1)]
    runs += [("grouped", "blocked", b) for b in (1, 7 * row, grouped_mm.BLOCK_BYTES)]
    for impl, schedule, budget in runs:
        monkeypatch.setattr(grouped_mm, "pick_schedule", lambda _x, _widths, s=schedule: s)
        monkeypatch.setattr(grouped_mm, "BLOCK_BYTES", budget)
        xi, wi = x.clone().requires_grad_(True), plan.weights.clone().requires_grad_(True)
        y = experts(xi, dataclasses.replace(plan, weights=wi), impl)
        assert y.dtype == torch.float32 and y.shape == (T, 16)
        (y * d_out).sum().backward()
        results.append([y, xi.grad, wi.grad, experts.w_in.grad, experts.w_out.grad]
                       + ([experts.b_in.grad, experts.b_out.grad] if bias else []))
        experts.zero_grad(set_to_none=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert_close_scaled(a.float(), b.float(), tol=tol)
    for y, x_grad, _, *weight_grads in results[1:]:
        assert torch.count_nonzero(y[T - 1]) == 0 and torch.count_nonzero(x_grad[T - 1]) == 0
        for g in weight_grads:
            assert torch.count_nonzero(g[1]) == 0 and torch.count_nonzero(g[4]) == 0
            assert all(torch.count_nonzero(g[e]) > 0 for e in (0, 2, 3, 5))


@pytest.mark.parametrize("budget", [1, 5, 16, 10_000])
def test_blocks_cover_every_slot_once_in_expert_order(budget, monkeypatch):
    monkeypatch.setattr(grouped_mm, "BLOCK_BYTES", budget * 1024)  # rows of 1 KB: budget slots
    counts = torch.tensor([5, 0, 9, 1, 0, 7, 0])
    blocks = grouped_mm._blocks(torch.cumsum(counts, 0), int(counts.sum()), "blocked", row_bytes=1024)
    assert blocks[0].start == 0 and blocks[-1].end == int(counts.sum())
    assert all(a.end == b.start for a, b in zip(blocks, blocks[1:]))
    members = [(e, blk.start + s, blk.start + t) for blk in blocks for e, s, t in blk.experts]
    assert [e for e, _, _ in members] == [0, 2, 3, 5]  # idle experts are in no block
    assert [t - s for _, s, t in members] == [5, 9, 1, 7]
    assert all(blk.end - blk.start >= budget for blk in blocks[:-1])  # only the last may be short
    assert len(blocks) == {1: 4, 5: 3, 16: 1, 10_000: 1}[budget]


def test_schedule_is_blocked_on_cpu_and_where_grouped_mm_cannot_run():
    x32, x16 = torch.randn(4, 16), torch.randn(4, 16).bfloat16()
    assert grouped_mm.pick_schedule(x32, (16, 32, 16)) == "blocked"  # CPU: cache-sized blocks
    assert grouped_mm.pick_schedule(x16, (16, 24, 12)) == "blocked"  # 12 bf16 = 24 bytes per row
    with pytest.raises(ValueError, match="schedule"):
        grouped_mm.grouped_moe(x32, torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.randn(2, 32, 16),
                               torch.randn(2, 16, 16), torch.zeros(2, dtype=torch.long), "swiglu", schedule="fast")


SINGLE_CASES = [(case, cf) for case in CASES for cf in (None, 0.5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case,capacity", SINGLE_CASES, ids=[f"{c}-cf{cf}" for c, cf in SINGLE_CASES])
def test_single_token_decode_matches_reference(case, capacity, dtype):
    """One token (decode at batch 1) skips dispatch for token choice; outputs, gradients,
    balancing losses and statistics are the reference's, and training still counts its load."""
    layer = make_layer(case, capacity, **(BF16_LIMIT.get(case, {}) if dtype == torch.bfloat16 else {}))
    x = torch.randn(1, 1, D, dtype=dtype)
    y1, y2, g1, g2 = run_both(layer, x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close_scaled(y1.float(), y2.float(), tol=tol)
    for a, b in zip(g1, g2):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        assert_close_scaled(a.float(), b.float(), tol=tol)
    torch.manual_seed(0)  # the same noise and jitter draws in both forwards
    layer(x)
    stats, aux = layer.last_stats, layer.aux_loss
    layer.impl = "loop"
    torch.manual_seed(0)
    layer(x)
    assert torch.equal(stats.tokens_per_expert, layer.last_stats.tokens_per_expert)
    assert stats.dropped_fraction == layer.last_stats.dropped_fraction
    torch.testing.assert_close(aux, layer.aux_loss)
    if layer.cfg.has_selection_bias:
        layer.router.load_since_update.zero_()
        layer.impl = "auto"
        layer(x)
        assert int(layer.router.load_since_update.sum()) == layer.cfg.top_k


@pytest.mark.parametrize("stream_max", [None, 0], ids=["streamed", "blas"])
@pytest.mark.parametrize("case", ["softmax-top2", "sigmoid-groups", "fine-shared-gated", "gelu"])
def test_single_token_inference_matches_reference(case, stream_max, monkeypatch):
    """Decode without grad: fp32 expert matrices go through the streamed product (its scratch
    buffer reused across calls and remade for a new dtype), or BLAS when over the size limit."""
    from moekit.layers import experts as experts_mod

    if stream_max is not None:
        monkeypatch.setattr(experts_mod, "STREAM_GEMV_MAX_BYTES", stream_max)
    layer = make_layer(case, None).eval()
    with torch.no_grad():
        for dtype, tol in [(torch.float32, 1e-5), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
            layer.to(dtype)
            x = torch.randn(1, 1, D, dtype=dtype)
            y, (y_ref, _) = layer(x), reference_moe(layer, x)
            assert y.dtype == dtype
            assert_close_scaled(y.float(), y_ref.float(), tol=tol)
    scratch = layer.experts._gemv_scratch
    assert (scratch is None) == (stream_max == 0)  # bf16 never streams; fp32 does under the limit


def test_auto_picks_decode_for_few_tokens_and_grouped_for_many():
    layer = make_layer("softmax-top2", None)
    assert layer.expert_impl(1) == "decode" and layer.expert_impl(64) == "decode"
    assert layer.expert_impl(65) == "grouped"
    layer.impl = "loop"
    assert layer.expert_impl(4096) == "loop"
    layer.impl = "fast"
    with pytest.raises(ValueError, match="impl"):
        layer(torch.randn(1, 2, D))


@pytest.mark.parametrize("impl", FAST)
def test_bf16_autocast_matches_bf16_loop(impl, monkeypatch):
    """Under CPU bf16 autocast the fast paths compute the experts in bf16, like autocast does
    to the loop's matmuls; the output and fp32 master-weight gradients agree."""
    layer = make_layer("fine-shared-gated", None)
    x = torch.randn(2, 40, D)
    outs = []
    for which in ["loop", impl]:
        use(layer, which, monkeypatch)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().sum().backward()
        outs.append([y.float(), xi.grad] + [p.grad.clone() for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    assert layer.experts.w_in.grad is None and outs[1][2].dtype == torch.float32
    for a, b in zip(outs[1], outs[0]):
        assert_close_scaled(a, b, tol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", FAST)
def test_forward_without_grad_matches_reference(impl, dtype, monkeypatch):
    """Inference (no grad: the grouped node keeps no activations for backward) gives the
    training forward's result."""
    layer = make_layer("fine-shared-gated", 0.5).eval().to(dtype)
    use(layer, impl, monkeypatch)
    x = torch.randn(3, 30, D, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        y_ref, _ = reference_moe(layer, x)
    assert y.dtype == dtype
    assert_close_scaled(y.float(), y_ref.float(), tol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_does_not_break_the_grouped_path(dtype):
    layer = MoELayer(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2)).to(dtype)
    layer.reset_parameters(0.5, 0.5)
    layer.impl = "grouped"
    compiled = torch.compile(layer, backend="eager")  # dynamo tracing only: no C++ build on CI
    x = torch.randn(2, 40, 16, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_c = compiled(x1)
    y_e = layer(x2)
    torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
    y_c.sum().backward()
    g_c = x1.grad.clone()
    y_e.sum().backward()
    torch.testing.assert_close(g_c, x2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation, act_args", [("swiglu", ()), ("clamped_swiglu", (0.5, 1.702)),
                                                  ("limited_swiglu", (0.5,))])
def test_a_row_rounds_the_same_wherever_it_sits(activation, act_args, dtype):
    """Offloaded experts run one expert's rows where memory runs a block of several: a row's
    activation must not depend on its neighbours, bit for bit (F = 16: no multiple of the
    CPU kernels' vector width, so a contiguous tensor would end in their scalar tail)."""
    from moekit.layers import grouped_act, mlp

    h = torch.randn(13, 32, generator=torch.Generator().manual_seed(0)).mul(2).to(dtype)  # [M, 2F]
    splits = (3, 5, 1, 4)
    whole = mlp.activate(h, activation, *act_args)
    assert torch.equal(whole, torch.cat([mlp.activate(p, activation, *act_args) for p in h.split(splits)]))
    node = grouped_act.activate(h, activation, torch.empty(13, 16, dtype=dtype), act_args)
    parts = [grouped_act.activate(p, activation, torch.empty(len(p), 16, dtype=dtype), act_args) for p in h.split(splits)]
    assert torch.equal(node, torch.cat(parts)) and torch.equal(node, whole)
