"""Routing analysis: token categories on hand-made text, the metrics on hand-built routings,
and ``moekit analyze`` end to end on a tiny trained checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console

from moekit import MoEConfig, ModelConfig
from moekit.analysis import metrics as M
from moekit.analysis.categories import (
    BUILTIN,
    builtin_scheme,
    encode_with_offsets,
    label_builtin,
    label_python,
    load_user_categories,
    token_categories,
)
from moekit.analysis.collect import capture_routing, routing_mask
from moekit.analysis.report import AnalyzeOptions, analyze
from moekit.cli import main
from moekit.data import DataConfig, bytes_tokenizer, default_corpus_root, train_bpe
from moekit.errors import UsageError
from moekit.layers.routers import Router, RouterOutput
from moekit.training import TrainConfig, load_run, train
from cli_helpers import usage_error


def names_at(text: str, labels: np.ndarray, piece: str, start: int = 0) -> set[str]:
    i = text.index(piece, start)
    return {BUILTIN[c] for c in labels[i:i + len(piece)]}


SRC = 'def f(x):\n    """Add ten."""\n    return x + 10  # "no" here\n'


def test_python_categories_on_hand_made_code():
    labels = label_python(SRC)
    assert labels is not None and len(labels) == len(SRC)
    assert names_at(SRC, labels, "def") == {"keyword"}
    assert names_at(SRC, labels, "f", SRC.index("f(")) == {"identifier"}
    assert names_at(SRC, labels, "(") == {"punctuation"}
    assert names_at(SRC, labels, "    ") == {"whitespace"}  # indentation
    assert names_at(SRC, labels, '"""Add ten."""') == {"string"}  # a docstring, spaces included
    assert names_at(SRC, labels, "return") == {"keyword"}
    assert names_at(SRC, labels, "+") == {"punctuation"}
    assert names_at(SRC, labels, "10") == {"number"}
    assert names_at(SRC, labels, '# "no" here') == {"comment"}  # quotes inside a comment stay comment
    assert names_at(SRC, labels, "\n") == {"whitespace"}


def test_invalid_python_falls_back_to_the_regex_lexer():
    bad = 'x = (1,\ndef g("open\n'  # unbalanced bracket and an unterminated string
    assert label_python(bad) is None
    labels = label_builtin(bad, "broken.py")
    assert names_at(bad, labels, "def") == {"keyword"}
    assert names_at(bad, labels, "g") == {"identifier"}
    assert names_at(bad, labels, '"open') == {"string"}
    assert names_at(bad, labels, "1") == {"number"}


def test_prose_documents_get_prose_labels():
    text = "Hello world, it's 42 degrees.\n"
    labels = label_builtin(text, "notes.md")
    assert names_at(text, labels, "Hello") == {"prose"}
    assert names_at(text, labels, "42") == {"number"}
    assert names_at(text, labels, ",") == {"punctuation"}
    assert names_at(text, labels, " ") == {"whitespace"}


def test_token_category_is_the_majority_of_its_characters():
    labels = np.array([1, 1, 2, 3, 2, 2, 0, 0, 4, 0, 0], dtype=np.int8)  # 0 = whitespace
    # majority 1; a tie 3/2 -> lowest index; one char; empty span; all whitespace; " x " -> x
    offsets = [(0, 3), (3, 5), (5, 6), (6, 6), (6, 8), (7, 10)]
    assert token_categories(labels, offsets, 5, other=4, whitespace=0).tolist() == [1, 2, 2, 4, 0, 4]
    assert token_categories(labels, [(7, 10)], 5, other=4).tolist() == [0]  # without the whitespace rule


def test_bytes_tokens_map_to_their_characters():
    text = "é = 1"  # é is two bytes: both belong to character 0
    ids, offsets = encode_with_offsets(bytes_tokenizer(), text)
    assert ids == list(text.encode()) and offsets[:3] == [(0, 1), (0, 1), (1, 2)]
    scheme = builtin_scheme()
    cats = token_categories(scheme.label(text, "x.py"), offsets, len(scheme.names), scheme.other, scheme.whitespace)
    assert [BUILTIN[c] for c in cats] == ["identifier", "identifier", "whitespace", "punctuation",
                                          "whitespace", "number"]


def test_bpe_offsets_label_tokens():
    tok = train_bpe([SRC * 20, "def return import while"], vocab_size=300)
    ids, offsets = encode_with_offsets(tok, SRC)
    assert ids == tok.encode(SRC)
    scheme = builtin_scheme()
    cats = token_categories(label_python(SRC), offsets, len(BUILTIN), scheme.other, scheme.whitespace)
    by_text = {SRC[s:e]: BUILTIN[c] for (s, e), c in zip(offsets, cats)}
    assert by_text["def"] == "keyword" and by_text[" f"] == "identifier" and by_text[" 10"] == "number"


def test_user_categories(tmp_path):
    f = tmp_path / "cats.txt"
    f.write_text("# comment line\nvowel\t[aeiou]\nletter=[a-z]\n\ndigit=\\d\n")
    scheme = load_user_categories(f)
    assert scheme.names == ("vowel", "letter", "digit", "other")
    labels = scheme.label("ab1!")
    assert [scheme.names[c] for c in labels] == ["vowel", "letter", "digit", "other"]  # first rule wins
    for bad, msg in (("x\t(", "bad regex"), ("novalue", "expected"), ("other=a", "reserved")):
        f.write_text(bad + "\n")
        with pytest.raises(UsageError, match=msg):
            load_user_categories(f)


# --- metrics on hand-built routings ---

def hand_mask() -> torch.Tensor:
    chosen = [[0, 1], [0, 1], [1, 2], [3, 1]]
    mask = torch.zeros(4, 5, dtype=torch.bool)
    for t, experts in enumerate(chosen):
        mask[t, experts] = True
    return mask


def test_coactivation_counts_pairs():
    co = M.coactivation(hand_mask())
    expected = np.zeros((5, 5), dtype=np.int64)
    for experts in ([0, 1], [0, 1], [1, 2], [3, 1]):
        for i in experts:
            for j in experts:
                expected[i, j] += 1
    np.testing.assert_array_equal(co, expected)
    assert co[0, 1] == 2 and co[1, 1] == 4 and co[4].sum() == 0


def test_coverage_and_load_stats():
    counts = hand_mask().sum(0).numpy()  # [2, 4, 1, 1, 0]
    cov = M.coverage(counts)
    assert cov["active_experts"] == 4 and cov["num_experts"] == 5 and cov["experts_for_90pct"] == 4
    assert M.coverage(np.array([5, 0, 3, 2]))["experts_for_90pct"] == 3
    s = M.load_stats(np.array([4, 0, 2, 2]))
    assert s["max_violation"] == pytest.approx(1.0) and s["cv"] == pytest.approx(np.sqrt(2) / 2)
    assert s["dead_experts"] == 1
    assert M.load_stats(np.array([3, 3, 3]))["max_violation"] == 0.0


def test_routing_mask_token_and_expert_choice():
    probs = torch.softmax(torch.randn(3, 4), -1)
    tc = RouterOutput(probs.log(), probs, torch.tensor([[2, 0], [1, 3], [2, 1]]), probs[:, :2], probs[:, :2])
    assert routing_mask(tc, 4).nonzero().tolist() == [[0, 0], [0, 2], [1, 1], [1, 3], [2, 1], [2, 2]]
    ids_EC = torch.tensor([[0], [2], [2], [1]])  # expert e takes token ids_EC[e]
    ec = RouterOutput(probs.log(), probs, ids_EC, probs[:4, :1], probs[:4, :1], expert_choice=True)
    assert routing_mask(ec, 4).nonzero().tolist() == [[0, 0], [1, 3], [2, 1], [2, 2]]


def test_category_specialization():
    mask = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    cats = np.array([0, 0, 1, 1])
    counts = M.category_counts(mask, cats, 2)
    np.testing.assert_array_equal(counts, [[2, 0], [0, 2]])
    spec = M.specialization(counts)
    assert spec["mutual_information_bits"] == pytest.approx(1.0) and spec["expert_entropy_bits"] == [0.0, 0.0]
    mixed = M.specialization(M.category_counts(mask, np.array([0, 1, 0, 1]), 2))
    assert mixed["mutual_information_bits"] == pytest.approx(0.0, abs=1e-12)
    assert mixed["expert_entropy_bits"] == [pytest.approx(1.0)] * 2


def test_top_tokens_counts_and_shares():
    mask = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    tokens = np.array([7, 7, 7, 3])
    top = M.top_tokens(mask, tokens, k=5)
    assert top[0] == [(7, 2, pytest.approx(2 / 3)), (3, 1, 1.0)]
    assert sorted(top[1]) == [(3, 1, 1.0), (7, 1, pytest.approx(1 / 3))]


@pytest.mark.parametrize("router_kind", ["softmax", "sigmoid", "expert_choice"])
def test_stability_is_zero_without_perturbation(router_kind):
    router = Router(MoEConfig(d_model=16, d_expert=8, num_experts=6, top_k=2, router=router_kind))
    router.reset_parameters(0.5)
    x = torch.randn(200, 16)
    assert M.perturbation_flip_rate(router, x, 0.0) == 0.0
    small, large = M.perturbation_flip_rate(router, x, 0.01), M.perturbation_flip_rate(router, x, 5.0)
    assert 0.0 <= small < large <= 1.0 and large > 0.3
    assert M.perturbation_flip_rate(router, x, 0.3, seed=1) == M.perturbation_flip_rate(router, x, 0.3, seed=1)


def test_top1_agreement():
    a = torch.tensor([0, 1, 2, 3])
    assert M.top1_agreement(a, a.clone()) == 1.0
    assert M.top1_agreement(a, torch.tensor([0, 1, 0, 0])) == 0.5
    with pytest.raises(ValueError):
        M.top1_agreement(a, a[:2])


# --- end to end on a tiny trained run ---

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "colorsys.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py"):
        shutil.copy(default_corpus_root() / name, corpus / name)
    model = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
                        moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2, capacity_factor=1.0))
    cfg = TrainConfig(data=DataConfig(sources=[str(corpus)], tokenizer="bytes", val_fraction=0.3), seq_len=32,
                      batch_size=4, max_steps=6, lr=1e-2, warmup_steps=2, eval_every=3, ckpt_every=3, keep_last=3,
                      cache_dir=str(tmp_path_factory.mktemp("cache")))
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(cfg, model, run_dir, console=Console(quiet=True))
    return run_dir, corpus


def test_analyze_end_to_end(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "report"
    report = analyze(run_dir, out, options=AnalyzeOptions(max_tokens=1024, sigmas=(0.0, 0.5)), log=lambda s: None)
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "load.png", "categories.png",
                                               "coactivation.png"}
    assert json.loads((out / "report.json").read_text())["tokens"] == report["tokens"] == 1024
    assert sum(report["category_totals"]) == 1024 and report["category_totals"][BUILTIN.index("keyword")] > 0
    for L in report["layers"]:
        load = np.array(L["tokens_per_expert"])
        assert load.sum() == 1024 * 2  # top-2, counted before capacity
        np.testing.assert_array_equal(np.diag(L["coactivation"]), load)
        assert np.array(L["category_counts"]).sum() == load.sum()
        assert L["stability"]["0.0"] == 0.0
        assert 0.0 <= L["dropped_fraction"] < 1.0 and L["coverage"]["active_experts"] == (load > 0).sum()
    agree = report["checkpoint_agreement"]
    assert [(a["from_step"], a["to_step"]) for a in agree] == [(3, 6)]
    assert all(0.0 <= x <= 1.0 for x in agree[0]["top1_agreement"])
    assert "Routing stability" in (out / "report.md").read_text()


def test_same_checkpoint_agrees_with_itself(tiny_run):
    run = load_run(tiny_run[0])
    batches = run.validation_batches(max_batches=2, log=lambda s: None)
    first, _ = capture_routing(run.model, batches)
    second, _ = capture_routing(load_run(tiny_run[0]).model, batches)
    assert [M.top1_agreement(a.top1, b.top1) for a, b in zip(first, second)] == [1.0, 1.0]


def test_analyze_cli_with_user_categories_and_data(tiny_run, tmp_path, capsys):
    run_dir, corpus = tiny_run
    cats = tmp_path / "cats.txt"
    cats.write_text("word\t[A-Za-z]+\nspace= +\n")
    out = tmp_path / "r"
    assert main(["analyze", str(run_dir), "--data", str(corpus / "heapq.py"), "--categories", str(cats),
                 "--max-tokens", "512", "--out", str(out), "--checkpoint", "best"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["categories"] == ["word", "space", "other"] and report["category_totals"][0] > 0
    assert "layer 0: max_violation" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["analyze", "/no/such/run"], "no such run folder"),
    (["analyze", "RUN", "--max-tokens", "0"], "--max-tokens"),
    (["analyze", "RUN", "--categories", "/no/such/file"], "cannot read categories file"),
    (["analyze", "RUN", "--checkpoint", "999"], "no checkpoint for step 999"),
    (["analyze", "RUN", "--data", "SHORT"], "fewer than one window"),
])
def test_analyze_bad_input_exits_2(tiny_run, tmp_path, capsys, args, message):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    args = [str(tiny_run[0]) if a == "RUN" else str(short) if a == "SHORT" else a for a in args]
    assert message in usage_error(args + ["--out", str(tmp_path / "o")], capsys)


def test_a_category_with_a_handful_of_tokens_is_not_coloured():
    from moekit.analysis.plots import category_columns

    counts = np.zeros((8, 3))
    counts[:, 0] = np.arange(8) * 40 + 20  # 1,280 slots: enough for a lift per expert
    counts[[1, 5], 1] = 2  # "other": 4 slots, lift 0 or 4 from pure chance
    values, labels = category_columns(counts, ["code", "other", "absent"])
    assert values.shape == (8, 2) and labels == ["code", "other (4 only)"]
    assert np.isfinite(values[:, 0]).all() and np.isnan(values[:, 1]).all()
