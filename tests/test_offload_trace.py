"""`moekit trace` on a real Hugging Face folder: the recorded experts are the routers' choices
(checked against analysis' independent capture), the prefetch guess is the next router applied
by hand to the previous block's output, the file round-trips, and a trace meets only its own
model (`plan-offload --model`)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_tokenizers import qwen_like

import moekit
from moekit.analysis.collect import capture_routing
from moekit.cli import main
from moekit.inference.loading import load_for_inference
from moekit.offload.trace import (NO_GUESS, TraceError, check_trace_matches, load_trace, model_config_of,
                                  token_stream)

TEXT = "def route(x):\n    return top_k(softmax(w @ x))\n" * 30 + "the experts are chosen per token\n" * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_trace")
    qwen_like(path)
    from moekit.inference.tokenization import load_tokenizer

    torch.manual_seed(0)
    cfg = moekit.ModelConfig(vocab_size=load_tokenizer(path).vocab_size, d_model=32, n_layers=3, n_heads=4,
                             n_kv_heads=2, d_ff=40, max_seq_len=64, init_std=0.3,
                             moe=moekit.MoEConfig(d_model=32, d_expert=16, num_experts=8, top_k=2))
    moekit.MoETransformer(cfg).save_pretrained(path, architecture="MixtralForCausalLM")
    (path.parent / "data.txt").write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def traced(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "t.trace"
    code = main(["trace", str(folder), "--data", str(folder.parent / "data.txt"), "--out", str(out),
                 "--max-tokens", "150", "--decode-tokens", "4"])
    assert code == 0
    return load_trace(out), out


def _hand_guess(model, ids_BS: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE layer i >= 1: softmax(W_router_i @ ffn_norm_i(output of block i-1)), its top-k."""
    h = model.embed(ids_BS)
    cos, sin = model.rope_tables(h.device)
    S = ids_BS.shape[1]
    guesses = []
    for i, block in enumerate(model.blocks):
        h = block(h, cos[:S], sin[:S])
        if i + 1 < len(model.blocks):
            nxt = model.blocks[i + 1]
            logits = F.linear(nxt.ffn_norm(h).flatten(0, 1).float(), nxt.ffn.router.weight.float())
            guesses.append(torch.softmax(logits, -1).topk(model.cfg.moe.top_k, -1).indices)
    return guesses


@torch.no_grad()
def test_trace_records_the_routers_choices_and_the_prefetch_guess(folder, traced):
    trace, _ = traced
    model, tok, _ = load_for_inference(folder)
    ids = token_stream([str(folder.parent / "data.txt")], tok, 150)
    assert trace.tokens.tolist() == ids.tolist() and trace.num_tokens == 150
    L, T, K = trace.experts.shape
    assert (L, T, K) == (3, 150, 2) and trace.experts.dtype == np.int16
    S = model.cfg.max_seq_len  # windows of the context: 64, 64, then 22 tokens
    for start in range(0, T, S):
        window = torch.from_numpy(ids[start: start + S])[None]
        captures, _ = capture_routing(model, [torch.cat([window, window[:, :1]], 1)])
        for layer, cap in enumerate(captures):
            got = trace.experts[layer, start: start + S]
            want = cap.mask.nonzero()[:, 1].view(-1, K).numpy()  # the chosen set of each token
            assert np.array_equal(np.sort(got, 1), want)
            assert np.array_equal(got[:, 0], cap.top1.numpy())  # rank order kept
        for layer, g in enumerate(_hand_guess(model, window), start=1):
            assert np.array_equal(np.sort(trace.guess[layer, start: start + S], 1), np.sort(g.numpy(), 1))
    assert (trace.guess[0] == NO_GUESS).all()


def test_trace_header_names_the_model(folder, traced):
    trace, _ = traced
    h = trace.header
    assert (h.family, h.moe_layers, h.num_experts, h.top_k) == ("mixtral", [0, 1, 2], 8, 2)
    assert h.expert_bytes == (2 * 16 * 32 + 32 * 16) * 4  # swiglu w_in [2F, D] + w_out [D, F], fp32
    assert h.decode_tokens_per_s > 0 and h.num_tokens == 150
    check_trace_matches(h, model_config_of(str(folder)), str(folder))  # its own model: no error


def test_trace_of_another_model_names_the_mismatch(folder, traced, tmp_path, capsys):
    _, path = traced
    other = json.loads((folder / "config.json").read_text())
    for key, value, needle in [("num_local_experts", 4, "experts per layer 8 in the trace, 4 in"),
                               ("num_experts_per_tok", 1, "top-k 2 in the trace, 1 in"),
                               ("hidden_size", 64, "d_model 32 in the trace, 64 in")]:
        changed = dict(other, **{key: value})
        if key == "hidden_size":
            changed["head_dim"] = 8
        (tmp_path / "config.json").write_text(json.dumps(changed))
        assert main(["plan-offload", str(path), "--cache-sizes", "2", "--bandwidth", "1",
                     "--model", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "is from another model" in err and len(err.splitlines()) == 1
    with pytest.raises(TraceError, match="MoE layers"):
        check_trace_matches(load_trace(path).header, moekit.get_preset("tiny-moe"), "tiny-moe")


def test_trace_bad_input(folder, tmp_path, capsys):
    dense = tmp_path / "dense"
    qwen_like(dense)
    (tmp_path / "d.txt").write_text(TEXT)
    from moekit.inference.tokenization import load_tokenizer

    cfg = moekit.ModelConfig(vocab_size=load_tokenizer(dense).vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                             max_seq_len=32, qkv_bias=True)
    moekit.MoETransformer(cfg).save_pretrained(dense, architecture="Qwen2ForCausalLM")
    cases = [([str(dense), "--data", str(tmp_path / "d.txt")], "dense model: it has no routing to trace"),
             ([str(folder), "--data", str(tmp_path / "missing.txt")], "missing.txt"),
             ([str(tmp_path / "nope"), "--data", str(tmp_path / "d.txt")], "no such model folder")]
    for argv, needle in cases:
        assert main(["trace", *argv, "--out", str(tmp_path / "x.trace")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1] and err[-1].startswith("moekit trace: error:")
    assert not (tmp_path / "x.trace").exists()


def test_a_trace_of_generated_tokens_routes_as_the_cached_decode_did(folder):
    """trace_tokens over prompt + output: each position's experts are those the engine's KV-cached
    decode used there (the API a real offloaded run's counters are compared through)."""
    from moekit.inference.engine import Engine
    from moekit.inference.sampling import SamplingParams
    from moekit.offload.trace import trace_tokens

    model, tok, _ = load_for_inference(folder)
    prompt = tok.encode("def route(x):")
    seq = Engine(model, tok, max_batch=1, record_routing=True).generate(
        [prompt], SamplingParams(max_new_tokens=10, temperature=0.0))[0]
    trace = trace_tokens(model, prompt + seq.output_ids, "hf")
    for i, routing in enumerate(seq.routing):  # token i was predicted at position len(prompt) - 1 + i
        pos = len(prompt) - 1 + i
        assert [sorted(ids) for ids in routing] == [sorted(trace.experts[layer, pos].tolist()) for layer in range(3)]


def test_expert_choice_routing_is_refused_in_one_line():
    from moekit.errors import UsageError
    from moekit.offload.trace import record_routing

    cfg = moekit.ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
                             moe=moekit.MoEConfig(d_model=16, d_expert=16, num_experts=4, top_k=1,
                                                  router="expert_choice"))
    with pytest.raises(UsageError, match="trace needs token-choice routing"):
        record_routing(moekit.MoETransformer(cfg), np.arange(20) % 64, window=16)
