"""Sparse upcycling: copy / granular / shared upcycling reproduce the dense model's logits at
step 0 (fp32 and bf16); drop re-initializes exactly its share; the CLI writes a folder that
loads like a run; bad input is one line, exit 2."""

import json

import hf_tokenizers as H
import pytest
import torch
from hf_tiny import build

from moekit import ModelConfig, MoETransformer
from moekit.adapt.upcycle import UpcycleConfig, step0_logit_difference, upcycle
from moekit.cli import main
from moekit.data import DataConfig
from moekit.data.tokenizer import bytes_tokenizer
from moekit.training import TrainConfig
from moekit.training.checkpoint import save_checkpoint
from moekit.training.run import load_run, write_run_files


def dense_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                 max_seq_len=32), **kw})


def dense_model(**kw) -> MoETransformer:
    m = MoETransformer(dense_cfg(**kw)).eval()
    with torch.no_grad():  # trained-looking norms, not all ones
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m


def tokens(vocab=257):
    return torch.randint(0, vocab, (2, 24))


VARIANTS = [
    dict(num_experts=4, top_k=2),  # copy
    dict(num_experts=4, top_k=1),  # copy, top-1 (renormalized)
    dict(num_experts=8, top_k=4, granularity=4),  # granular: 2 copies of 4 shards
    dict(num_experts=8, top_k=2, granularity=2, shared=1),
    dict(num_experts=4, top_k=2, shared=2),
]


@pytest.mark.parametrize("up", VARIANTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_step0_logits_equal_the_dense_model(up, activation):
    dense = dense_model(ffn_activation=activation)
    moe = upcycle(dense, UpcycleConfig(**up))
    assert moe.cfg.moe.num_experts == up["num_experts"] and len(moe.moe_layers()) == 2
    x = tokens()
    logits = dense(x).logits
    assert logits.abs().max() > 0.1  # not a degenerate model
    assert step0_logit_difference(dense, moe, x) < 1e-5
    # bf16: the same models in half precision agree to bf16 rounding of logits of this size
    d16, m16 = dense.to(torch.bfloat16), moe.to(torch.bfloat16)
    assert step0_logit_difference(d16, m16, x) <= 0.02 * logits.abs().max().item()


def test_step0_equality_holds_for_the_gradient_too():
    """The upcycled model is a function-preserving re-parameterization: the input gradient agrees too."""
    dense, x = dense_model(), tokens()
    moe = upcycle(dense, UpcycleConfig(num_experts=8, top_k=4, granularity=2))
    grads = []
    for m in (dense, moe):
        emb = m.embed.weight
        emb.grad = None
        m(x).logits.square().sum().backward()
        grads.append(emb.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_granular_router_rows_are_tied_within_a_copy():
    moe = upcycle(dense_model(), UpcycleConfig(num_experts=8, top_k=4, granularity=4))
    w = moe.blocks[0].ffn.router.weight  # [E, D], expert e = copy * G + shard
    assert torch.equal(w[0], w[3]) and torch.equal(w[4], w[7]) and not torch.equal(w[0], w[4])
    assert moe.cfg.moe.d_expert == 16


def test_drop_reinitializes_its_share_of_each_expert_from_the_dense_statistics():
    dense = dense_model()
    copy = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2))
    drop = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, strategy="drop", drop_ratio=0.25))
    a, b = copy.blocks[0].ffn.experts, drop.blocks[0].ffn.experts
    changed_units = (a.w_out != b.w_out).any(dim=1)  # [E, F]: down columns re-drawn
    assert changed_units.sum(1).tolist() == [16] * 4  # round(0.25 * 64) per expert
    assert not torch.equal(changed_units[0], changed_units[1])  # each expert its own units
    gate_changed = (a.w_in[:, :64] != b.w_in[:, :64]).any(-1)  # [E, F] gate rows
    assert torch.equal(gate_changed, changed_units)
    dense_out = dense.blocks[0].ffn.w_out.weight
    fresh = b.w_out.permute(0, 2, 1)[changed_units]  # the re-drawn columns
    assert abs(fresh.std().item() / dense_out.std().item() - 1) < 0.1
    assert step0_logit_difference(dense, drop, tokens()) > 1e-3  # no longer the dense function


def test_noise_breaks_symmetry_between_experts():
    moe = upcycle(dense_model(), UpcycleConfig(num_experts=4, top_k=2, noise=1e-3))
    w = moe.blocks[0].ffn.experts.w_in
    assert not torch.equal(w[0], w[1]) and (w[0] - w[1]).abs().max() < 1e-2


def test_bad_upcycle_configs_name_the_problem():
    with pytest.raises(ValueError, match="already MoE"):
        upcycle(upcycle(dense_model(), UpcycleConfig(num_experts=4, top_k=2)), UpcycleConfig(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="granularity 3 does not divide the FFN width d_ff=64"):
        upcycle(dense_model(), UpcycleConfig(num_experts=6, top_k=3, granularity=3))
    with pytest.raises(ValueError, match="multiple of granularity"):
        UpcycleConfig(num_experts=8, top_k=2, granularity=4)


# ----- the command -----

@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "dense"
    model = dense_model()
    write_run_files(folder, TrainConfig(data=DataConfig(tokenizer="bytes"), seq_len=32), model.cfg, bytes_tokenizer())
    save_checkpoint(folder, model, {"step": 5})
    return folder


def test_cli_upcycles_a_run_into_a_run_folder(dense_run, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["upcycle", str(dense_run), "--experts", "4", "--top-k", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    diff = float(printed.split("to the dense model: ")[1].split()[0])
    assert diff < 1e-5
    record = json.loads((out / "upcycle.json").read_text())
    assert record["step0_max_logit_diff"] == pytest.approx(diff, rel=1e-2) and record["config"]["num_experts"] == 4
    run = load_run(out)  # eval / sample / train --init read it like any run
    x = tokens()
    dense = load_run(dense_run).model
    assert run.model.cfg.moe.num_experts == 4
    assert (run.model(x).logits - dense(x).logits).abs().max() < 1e-5
    assert (out / "tokenizer.json").read_text() == (dense_run / "tokenizer.json").read_text()


def test_cli_upcycles_a_hugging_face_qwen2_folder(tmp_path, capsys):
    hf = tmp_path / "qwen2"
    build("qwen2").save_pretrained(hf)
    H.qwen_like(hf)
    out = tmp_path / "moe"
    assert main(["upcycle", str(hf), "--experts", "4", "--top-k", "2", "--out", str(out)]) == 0
    assert float(capsys.readouterr().out.split("to the dense model: ")[1].split()[0]) < 1e-4
    assert (out / "tokenizer.json").read_text() == (hf / "tokenizer.json").read_text()
    assert (out / "tokenizer_config.json").exists()  # special tokens and chat template travel along
    moe = load_run(out).model
    assert moe.cfg.qkv_bias and moe.cfg.moe.num_experts == 4


def test_a_copy_upcycled_llama_exports_as_mixtral_that_transformers_runs(tmp_path):
    transformers = pytest.importorskip("transformers")
    from moekit.interop import from_pretrained

    build("llama").save_pretrained(tmp_path / "llama")
    dense = from_pretrained(tmp_path / "llama", dtype=torch.float32)
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2))
    moe.save_pretrained(tmp_path / "mixtral", architecture="MixtralForCausalLM")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral", dtype=torch.float32).eval()
    x = tokens(moe.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, moe(x).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ref(x).logits, dense(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--granularity", "3", "--experts", "6", "--top-k", "3"], "granularity 3 does not divide the FFN width"),
    (["--experts", "4", "--top-k", "5"], "top_k (5) must be <= num_experts (4)"),
    (["--experts", "4", "--top-k", "2", "--drop-ratio", "0.3"], "--drop-ratio needs --strategy drop"),
])
def test_cli_bad_input_is_one_line_exit_2(dense_run, tmp_path, capsys, extra, message):
    assert main(["upcycle", str(dense_run), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_cli_refuses_an_moe_model(dense_run, tmp_path, capsys):
    moe = tmp_path / "moe"
    assert main(["upcycle", str(dense_run), "--experts", "4", "--top-k", "2", "--out", str(moe)]) == 0
    capsys.readouterr()
    assert main(["upcycle", str(moe), "--experts", "4", "--top-k", "2", "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "already MoE" in err and err.count("\n") == 1
