"""Padded expert slices (``layers/row_padding.py``): the bucket rule bounds the row counts, the
padded layout keeps every real slot in order, and the grouped node with padding equals the node
without it and the per-expert loop, forward and every gradient, fp32 and bf16, with idle
experts, counts already on a bucket and expert biases (GPT-OSS)."""

import dataclasses

import pytest
import torch

from moekit.layers import row_padding
from moekit.layers.dispatch import DispatchPlan
from moekit.layers.experts import Experts
from moekit.layers.grouped_mm import grouped_moe
from moekit.layers.row_padding import pad_slices, padded_rows, wants_padding

from test_moe_layer import assert_close_scaled


def test_padded_rows_bounds_the_waste_and_the_number_of_shapes():
    sizes = [padded_rows(n) for n in range(2049)]
    assert sizes[0] == 0
    for n, p in enumerate(sizes[1:], start=1):
        assert p >= n and p - n < max(row_padding.MIN_BUCKET, n / row_padding.STEPS_PER_OCTAVE)
        assert padded_rows(p) == p  # a bucket is its own bucket
    assert sizes == sorted(sizes)
    assert len(set(sizes) - {0}) == 24  # 16..128 by 16, then 4 per doubling up to 2048


def test_pad_slices_layout():
    counts = torch.tensor([3, 0, 16, 17, 1])  # 16 is already a bucket; 0 stays empty
    token_ids = torch.randint(0, 50, (int(counts.sum()),))
    weights = torch.rand(token_ids.shape[0]) + 0.1  # no real weight is 0
    ids_P, w_P, counts_P = pad_slices(token_ids, weights, counts)
    assert counts_P.tolist() == [16, 0, 16, 32, 16]
    assert ids_P.shape == w_P.shape == (int(counts_P.sum()),)
    real = w_P != 0
    torch.testing.assert_close(ids_P[real], token_ids, rtol=0, atol=0)  # real slots kept, in order
    torch.testing.assert_close(w_P[real], weights, rtol=0, atol=0)
    start_M, start_P = 0, 0
    for n, p in zip(counts.tolist(), counts_P.tolist()):
        assert bool(real[start_P:start_P + n].all()) and not bool(real[start_P + n:start_P + p].any())
        if p > n:  # pads repeat the expert's last real token
            assert bool((ids_P[start_P + n:start_P + p] == token_ids[start_M + n - 1]).all())
        start_M, start_P = start_M + n, start_P + p
    on_buckets = torch.tensor([16, 0, 32])
    ids = torch.arange(48)
    assert pad_slices(ids, torch.rand(48), on_buckets)[0] is ids  # nothing to pad: unchanged


def test_padding_only_where_onednn_multiplies_each_slice(monkeypatch):
    x = torch.randn(4, 8)
    for half in (torch.bfloat16, torch.float16):  # bf16 on AVX-512; fp16 needs AVX512-FP16 / AMX-FP16
        assert wants_padding(x.to(half), "blocked") == (half in row_padding.ONEDNN_HALF)
        assert not wants_padding(x.to(half), "grouped")  # one grouped_mm per projection
    assert not wants_padding(x, "blocked")  # fp32: MKL
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # half matmuls off oneDNN: no primitive cache
    assert not wants_padding(x.bfloat16(), "blocked")


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "clamped_swiglu"])
def test_padded_node_equals_unpadded_and_loop(activation, dtype, bias):
    """Uneven slices: an idle expert, counts of exactly 16 and 32 (nothing to pad), counts that
    pad by 1-15 rows, tokens repeated across experts and one token with no slot. Outputs and the
    gradients of the input, the routing weights, the expert weights and biases agree with the
    unpadded node and with autograd through the plain loop; the unused token and the idle
    expert get exact zeros, so no pad slot's gradient leaks into them."""
    torch.manual_seed(0)
    act_args = {"clamped_swiglu": (0.5 if dtype == torch.float32 else 50.0, 1.702)}.get(activation, ())
    experts = Experts(6, 16, 16, activation, bias=bias, act_args=act_args).to(dtype)
    experts.reset_parameters(0.3, 0.3)
    if bias:
        with torch.no_grad():
            experts.b_in.normal_(std=0.3), experts.b_out.normal_(std=0.3)
    counts = torch.tensor([5, 0, 16, 1, 32, 19])
    T = 40
    token_ids = torch.cat([torch.randperm(T - 1)[:n] for n in counts.tolist()])  # token T-1 unused
    plan = DispatchPlan(token_ids=token_ids, weights=torch.rand(len(token_ids)), counts=counts,
                        routed_counts=counts, num_dropped=0, num_routed=len(token_ids), capacity=None)
    x, d_out = torch.randn(T, 16, dtype=dtype), torch.randn(T, 16)
    results = []
    for pad in (None, False, True):  # None: the loop
        xi, wi = x.clone().requires_grad_(True), plan.weights.clone().requires_grad_(True)
        if pad is None:
            y = experts(xi, dataclasses.replace(plan, weights=wi), "loop")
        else:
            y = grouped_moe(xi, token_ids, wi, experts.w_in, experts.w_out, counts, activation, schedule="blocked",
                            b_in=experts.b_in if bias else None, b_out=experts.b_out if bias else None,
                            act_args=act_args, pad=pad)
        (y * d_out).sum().backward()
        grads = [xi.grad, wi.grad, experts.w_in.grad, experts.w_out.grad]
        results.append([y] + grads + ([experts.b_in.grad, experts.b_out.grad] if bias else []))
        experts.zero_grad(set_to_none=True)
    loop, unpadded, padded = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b, c in zip(padded, unpadded, loop):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close_scaled(a.float(), b.float(), tol=tol)
        assert_close_scaled(a.float(), c.float(), tol=tol)
    y, x_grad, _, *weight_grads = padded
    assert torch.count_nonzero(y[T - 1]) == 0 and torch.count_nonzero(x_grad[T - 1]) == 0
    for g in weight_grads:
        assert torch.count_nonzero(g[1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_inference_equals_unpadded(dtype):
    """Without grad (prefill), on a routing of many tokens: same result as the unpadded node
    (GEMM rows are independent, so the real rows come out alike; bitwise on CPUs tried)."""
    torch.manual_seed(1)
    E, D, T, K = 8, 32, 300, 2
    w_in, w_out = (torch.randn(E, 48, D) * 0.2).to(dtype), (torch.randn(E, D, 24) * 0.2).to(dtype)
    x = torch.randn(T, D, dtype=dtype)
    expert_N = torch.randint(0, E, (T * K,))
    order = torch.argsort(expert_N, stable=True)
    token_ids, weights, counts = order // K, torch.rand(T * K)[order], torch.bincount(expert_N, minlength=E)
    with torch.no_grad():
        ys = [grouped_moe(x, token_ids, weights, w_in, w_out, counts, "swiglu", schedule="blocked", pad=p)
              for p in (False, True)]
    assert_close_scaled(ys[1], ys[0], tol=1e-5 if dtype == torch.float32 else 1e-2)
