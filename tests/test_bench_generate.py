"""The bandwidth arithmetic of the decode benchmarks against plain counts: the bytes a decode
step reads, from the model's own parameters, and the expected experts a batch touches, from
random top-k draws."""

import pytest
import torch

import moekit
from moekit.bench.generate import active_weight_bytes, batching_ceiling, decode_step_bytes
from moekit.layers.kv_cache import KVCache


def _model(tie: bool = False) -> moekit.MoETransformer:
    cfg = moekit.ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                             tie_embeddings=tie, moe=moekit.MoEConfig(d_model=32, d_expert=16, num_experts=8, top_k=2))
    return moekit.MoETransformer(cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_step_bytes_count_the_model_parameters(tie):
    """Batch 1 reads the active weights; a huge batch reads every weight but the embedding
    table (tied: the table is the LM head, read whole); both plus each row's KV."""
    model = _model(tie)
    cfg, bpp, context = model.cfg, 4, 10
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    other = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
    other -= 0 if tie else model.embed.weight.numel()
    kv_token = KVCache(cfg, 1, 1).nbytes  # one slot, one token, fp32: every layer's k and v
    assert decode_step_bytes(cfg, 1, context, bpp) == pytest.approx((other + experts * 2 / 8) * bpp + kv_token * context)
    assert decode_step_bytes(cfg, 1, 0, bpp) == pytest.approx(active_weight_bytes(cfg, bpp) + (bpp * 96 * 32 if tie else 0))
    big = decode_step_bytes(cfg, 10_000, context, bpp)
    assert big == pytest.approx((other + experts) * bpp + kv_token * context * 10_000)


def test_touched_experts_match_random_top_k_draws():
    """The experts term at batch B against the mean number of distinct experts that B tokens'
    random top-2-of-8 choices touch; the ceiling is 1 at batch 1 and between 1 and B above."""
    cfg = _model().cfg
    one_expert = len(cfg.moe_layer_ids) * 3 * cfg.d_model * cfg.moe.d_expert  # SwiGLU: gate, up, down
    no_experts = decode_step_bytes(cfg, 1, 0, 1) - 2 * one_expert
    g = torch.Generator().manual_seed(0)
    for B in (1, 4, 16):
        draws = [len({e for _ in range(B) for e in torch.randperm(8, generator=g)[:2].tolist()}) for _ in range(2000)]
        touched = sum(draws) / len(draws)
        assert decode_step_bytes(cfg, B, 0, 1) - no_experts == pytest.approx(touched * one_expert, rel=0.02)
    assert batching_ceiling(cfg, 1, 10, 4) == pytest.approx(1.0)
    assert 1 < batching_ceiling(cfg, 16, 10, 4) < 16


def test_peak_memory_measures_whole_and_chunked_prefill_in_a_fresh_process(tmp_path):
    """The memory phase of `bench generate`: a child process loads the exported model, generates,
    and reports its peak over weights + KV; with a prefill chunk the prompts go in several forwards."""
    from moekit.bench.generate import build_export, peak_memory

    cfg = _model().cfg
    build_export(cfg, str(tmp_path))
    whole = peak_memory(str(tmp_path), cfg, "fp32", 2, 24, 4)
    chunked = peak_memory(str(tmp_path), cfg, "fp32", 2, 24, 4, prefill_chunk=8)
    weights = sum(p.numel() * 4 for p in _model().parameters())
    for m in (whole, chunked):
        assert m.get("peak") is not None, m
        assert m["weights"] == weights and m["peak"] > 0 and m["kv"] > 0
        assert m["overhead"] == pytest.approx(m["peak"] / (m["weights"] + m["kv"]) - 1)
    # Whole prompts: one prefill forward, then 3 decode steps for both rows together. Chunks of
    # 8: 3 forwards per prompt, one row after the other, and the first row's 3 decode steps run
    # beside the second's prefill (their own forwards) instead of with the second row's.
    assert (whole["forwards"], chunked["forwards"]) == (1 + 3, 2 * 3 + 3 + 3)
