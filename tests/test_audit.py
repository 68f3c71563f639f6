"""Audits of published claims: paper-shaped counts against transformers and moekit's accounting,
and docs/audits.md against the code that generates it."""

from dataclasses import replace
from pathlib import Path

import pytest

from moekit import MoEConfig, ModelConfig, count_params
from moekit.audit import PAPER_MODELS, PaperConfig, audit_table, count_paper_params
from moekit.cli import main

DOC = Path(__file__).parent.parent / "docs" / "audits.md"


def _switch_transformers_count(p: PaperConfig) -> int:
    """transformers' SwitchTransformers built from ``p`` on the meta device (no weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sparse = lambda n: n // p.moe_every  # noqa: E731  (transformers' sparse step is n // this)
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=p.vocab_size, d_model=p.d_model, d_ff=p.d_ff, d_kv=p.head_dim, num_heads=p.n_heads,
        num_layers=p.encoder_layers, num_decoder_layers=p.decoder_layers, num_experts=p.num_experts,
        num_sparse_encoder_layers=sparse(p.encoder_layers), num_sparse_decoder_layers=sparse(p.decoder_layers),
        relative_attention_num_buckets=p.relative_attention_buckets, tie_word_embeddings=p.tie_embeddings,
    )
    with torch.device("meta"):
        model = transformers.SwitchTransformersForConditionalGeneration(cfg)
    return sum(t.numel() for t in model.parameters())


@pytest.mark.parametrize("change", [{}, {"moe_every": 1, "decoder_layers": 3, "encoder_layers": 5},
                                    {"num_experts": 3, "d_ff": 100, "n_heads": 5}])
def test_encoder_decoder_count_equals_transformers_switch(change):
    p = replace(PAPER_MODELS["switch-base-8"], **change)
    assert count_paper_params(p).total == _switch_transformers_count(p)


def test_decoder_only_count_equals_moekit_accounting():
    """Grok-1's shape as a ModelConfig: the paper path and the built-model path count alike."""
    p = PAPER_MODELS["grok-1"]
    cfg = ModelConfig(vocab_size=p.vocab_size, d_model=p.d_model, n_layers=p.decoder_layers, n_heads=p.n_heads,
                      n_kv_heads=p.n_kv_heads, head_dim=p.head_dim, tie_embeddings=True,
                      moe=MoEConfig(d_model=p.d_model, d_expert=p.d_ff, num_experts=p.num_experts, top_k=p.top_k))
    ours, theirs = count_paper_params(p), count_params(cfg)
    assert (ours.total, ours.active) == (theirs.total, theirs.active)


def test_active_counts_k_of_e_experts_through_both_stacks():
    p = PAPER_MODELS["switch-c-2048"]
    pc = count_paper_params(p)
    per_expert = 2 * p.d_model * p.d_ff
    assert pc.total - pc.active == 30 * (2048 - 1) * per_expert  # 15 + 15 MoE layers, top-1
    assert pc.total == pytest.approx(1571e9, rel=0.001)  # the paper's Table 9


def test_doc_table_is_the_generated_one():
    assert audit_table() in DOC.read_text(), "regenerate docs/audits.md with `moekit inspect --audit`"


def test_rumour_is_labelled(capsys):
    assert main(["inspect", "gpt-4-rumoured"]) == 0
    out = capsys.readouterr().out
    assert "RUMOUR" in out and "1.83T" in out
    assert "| gpt-4-rumoured | rumour |" in audit_table()


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_inspect_by_name(name, capsys):
    import json

    assert main(["inspect", name, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    pc = count_paper_params(PAPER_MODELS[name])
    assert (out["total_params"], out["active_params"]) == (pc.total, pc.active)
    assert set(out["weight_bytes"]) >= {"bf16", "fp8", "int4"}
    a, p = pc.active_breakdown, PAPER_MODELS[name]
    matmul = pc.active - a["embeddings"] - a["lm_head"] - a["norms"] + p.vocab_size * p.d_model
    assert out["forward_flops_per_token"] == 2 * matmul


def test_bad_input_is_one_line(capsys):
    assert main(["inspect"]) == 2
    assert main(["inspect", "grok-1", "--ep", "2"]) == 2
    assert capsys.readouterr().err.count("\n") == 2
    with pytest.raises(ValueError, match="status"):
        replace(PAPER_MODELS["grok-1"], status="leak")
    with pytest.raises(ValueError, match="top_k"):
        replace(PAPER_MODELS["grok-1"], top_k=9)
