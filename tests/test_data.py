"""The data pipeline: sources, tokenizers, the cached split, batches, and bad input."""

import json
import os
import random
import string
import sys
import time

import numpy as np
import pytest
import torch

from moekit.data import DataConfig, prepare_data, train_batch, validation_batches
from moekit.data.dataset import check_length, split_value
from moekit.data.sources import Corpus, resolve_sources, split_parts
from moekit.data.tokenizer import TextTokenizer, bytes_tokenizer, load_tokenizer, train_bpe
from moekit.errors import UsageError


def _random_doc(rng: random.Random, i: int) -> str:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(rng.randint(30, 80))]
    return f"doc {i}: " + " ".join(words) + "\n"


@pytest.fixture
def corpus_dir(tmp_path):
    rng = random.Random(7)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(40):
        (d / ("sub" if i % 3 else ".") / f"f{i:02d}.txt").write_text(_random_doc(rng, i))
    (d / "ignored.bin").write_bytes(b"\x00\x01")  # not a text suffix: not read from a folder
    return d


def _docs_in(tokens: np.ndarray, tok: TextTokenizer) -> list[str]:
    """Split a token array at end-of-text tokens and decode each document."""
    ids = tokens.tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == tok.eos_id:
            docs.append(tok.decode(ids[start:i]))
            start = i + 1
    return docs


def test_split_is_by_document_and_deterministic(corpus_dir, tmp_path):
    cfg = DataConfig(sources=[str(corpus_dir)], tokenizer="bytes", val_fraction=0.25, split_seed=3)
    a = prepare_data(cfg, tmp_path / "c1", log=lambda s: None)
    b = prepare_data(cfg, tmp_path / "c2", log=lambda s: None)  # a fresh cache: rebuilt from scratch
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    val_docs = set(_docs_in(a.val, a.tokenizer))
    train_docs = set(_docs_in(a.train, a.tokenizer))
    corpus = {f.name: f.path.read_text() for f in Corpus([str(corpus_dir)]).files}
    assert len(corpus) == 40 and val_docs | train_docs == set(corpus.values()) and not val_docs & train_docs
    expected_val = {text for name, text in corpus.items() if split_value(name, 3) < 0.25}
    assert val_docs == expected_val and 0 < len(val_docs) < 40
    other = prepare_data(DataConfig(**{**cfg.__dict__, "split_seed": 4}), tmp_path / "c1", log=lambda s: None)
    assert set(_docs_in(other.val, other.tokenizer)) != val_docs


def test_cache_is_reused_and_invalidated_by_a_changed_file(corpus_dir, tmp_path, monkeypatch):
    cfg = DataConfig(sources=[str(corpus_dir)], tokenizer="bytes")
    first = prepare_data(cfg, tmp_path / "cache", log=lambda s: None)

    def no_encoding(self, texts):
        raise AssertionError("a cache hit must not tokenize again")

    monkeypatch.setattr(TextTokenizer, "encode_batch", no_encoding)
    again = prepare_data(cfg, tmp_path / "cache", log=lambda s: None)
    assert again.path == first.path and np.array_equal(again.train, first.train)
    assert isinstance(again.train, np.memmap)
    monkeypatch.undo()
    (corpus_dir / "f00.txt").write_text("changed text, longer than before " * 5)
    changed = prepare_data(cfg, tmp_path / "cache", log=lambda s: None)
    assert changed.path != first.path


def test_bpe_tokenizer_trains_round_trips_and_is_cached(corpus_dir, tmp_path, monkeypatch):
    cfg = DataConfig(sources=[str(corpus_dir)], vocab_size=300)
    data = prepare_data(cfg, tmp_path / "cache", log=lambda s: None)
    tok = data.tokenizer
    assert tok.kind == "bpe" and tok.vocab_size == 300 and int(data.train.max()) < 300
    text = "def f(x):\n    return x  # ünïcödé ✓ and unseen words"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("doc 1: ")) < len("doc 1: ")  # merges learned from the corpus
    tok.save(tmp_path / "tok.json")
    assert load_tokenizer(tmp_path / "tok.json").encode(text) == tok.encode(text)

    def no_training(*a, **k):
        raise AssertionError("a cached tokenizer must not be trained again")

    monkeypatch.setattr("moekit.data.dataset.train_bpe", no_training)
    again = prepare_data(cfg, tmp_path / "cache", log=lambda s: None)
    assert again.tokenizer.fingerprint == tok.fingerprint


def test_bpe_training_is_deterministic():
    rng = random.Random(1)
    texts = [_random_doc(rng, i) for i in range(30)]
    assert train_bpe(texts, 400).to_json() == train_bpe(texts, 400).to_json()


def test_bytes_tokenizer():
    tok = bytes_tokenizer()
    text = "héllo\n"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text) + [tok.eos_id]) == text
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_train_batch_is_a_pure_function_of_seed_and_index():
    tokens = np.arange(1000, dtype=np.uint16)
    a = train_batch(tokens, 4, 16, seed=5, index=3)
    assert a.shape == (4, 17) and a.dtype == torch.int64
    assert torch.equal(a, train_batch(tokens, 4, 16, seed=5, index=3))
    assert not torch.equal(a, train_batch(tokens, 4, 16, seed=5, index=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 16, dtype=torch.int64))  # contiguous windows


def test_validation_batches_are_fixed_non_overlapping_windows():
    tokens = np.arange(200, dtype=np.uint16)
    batches = validation_batches(tokens, batch_size=3, seq_len=10, max_batches=2)
    windows = torch.cat(batches)
    assert [b.shape[0] for b in batches] == [3, 3] and windows.shape[1] == 11
    starts = windows[:, 0].tolist()
    assert all(s % 10 == 0 for s in starts) and len(set(starts)) == 6
    assert all(b - a >= 10 for a, b in zip(starts, starts[1:]))
    assert starts[0] == 0 and starts[-1] == 180  # spread over the whole split


def test_split_parts_cuts_long_text_at_line_ends():
    text = "".join(f"line {i} " + "x" * (i % 17) + "\n" for i in range(500))
    parts = split_parts(text, limit=300)
    assert "".join(parts) == text and all(len(p) <= 300 for p in parts)
    assert all(p.endswith("\n") for p in parts)
    one_line = "y" * 1000
    assert split_parts(one_line, limit=300) == ["y" * 300, "y" * 300, "y" * 300, "y" * 100]


def test_one_big_file_still_gets_a_validation_split(tmp_path):
    rng = random.Random(3)
    big = tmp_path / "book.txt"
    big.write_text("".join(_random_doc(rng, i) for i in range(600)))  # > 2 parts of 64K characters
    data = prepare_data(DataConfig(sources=[str(big)], tokenizer="bytes"), tmp_path / "cache", log=lambda s: None)
    assert data.meta["documents"] > 2 and len(data.val) > 0 and len(data.train) > len(data.val)


def test_files_folders_and_globs_resolve_to_one_sorted_list(corpus_dir):
    (corpus_dir / "sub" / "notes.md").write_text("# notes\n")
    specs = [str(corpus_dir / "sub" / "*.md"), str(corpus_dir / "f00.txt"), str(corpus_dir / "**" / "f0*.txt")]
    files = resolve_sources(specs)
    names = [f.path.name for f in files]
    assert sorted(names) == sorted({"notes.md", "f00.txt", *(f"f0{i}.txt" for i in range(10))})  # f00 once
    folder = {f.name for f in resolve_sources([str(corpus_dir)])}
    assert "sub/notes.md" in folder and "f00.txt" in folder and "ignored.bin" not in folder and len(folder) == 41


def test_jsonl_documents(tmp_path):
    rng = random.Random(4)
    path = tmp_path / "d.jsonl"
    rows = [{"body": _random_doc(rng, i), "id": i} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = list(Corpus([str(path)], text_field="body").documents())
    assert [d.text for d in docs] == [r["body"] for r in rows] and docs[1].name == "d.jsonl:2"


def test_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is in the dev extra; install .[dev]")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["first document", "second one"], "n": [1, 2]}), path)
    assert [d.text for d in Corpus([str(path)]).documents()] == ["first document", "second one"]
    with pytest.raises(UsageError, match="body"):
        list(Corpus([str(path)], text_field="body").documents())


def test_parquet_without_pyarrow_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(UsageError, match="needs pyarrow"):
        list(Corpus([str(path)]).documents())


# --- bad input: one clear line, nothing half-written -----------------------------------------


def _cache_entries(cache):
    data = cache / "data"
    return sorted(p.name for p in data.iterdir()) if data.exists() else []


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: [str(d / "missing.txt")], "no such file or folder"),
        (lambda d: [str(d / "*.nothing")], "no files match"),
        (lambda d: [str((d / "emptydir").mkdir() or d / "emptydir")], "no text files in folder"),
        (lambda d: [str((d / "e.txt").write_text("  \n") and d / "e.txt")], "the corpus is empty"),
        (lambda d: [str((d / "l.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n') and d / "l.jsonl")],
         "line 2 has no 'text' field"),
        (lambda d: [str((d / "j.jsonl").write_text('{"text": "a"}\n{oops\n') and d / "j.jsonl")],
         "line 2: not valid JSON"),
    ],
)
def test_bad_sources_raise_one_line_and_write_nothing(tmp_path, make, needle):
    specs = make(tmp_path)
    with pytest.raises(UsageError, match=needle) as err:
        prepare_data(DataConfig(sources=specs, tokenizer="bytes"), tmp_path / "cache", log=lambda s: None)
    assert "\n" not in str(err.value)
    assert _cache_entries(tmp_path / "cache") == []


def test_undecodable_files_are_skipped_and_counted(corpus_dir, tmp_path):
    (corpus_dir / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    data = prepare_data(DataConfig(sources=[str(corpus_dir)], tokenizer="bytes"), tmp_path / "c", log=lambda s: None)
    assert data.meta["skipped_files"] == [str(corpus_dir / "latin1.txt")]
    assert data.meta["documents"] == 40
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(UsageError, match=r"the corpus is empty.*1 file\(s\) skipped as not UTF-8"):
        prepare_data(DataConfig(sources=[str(only_bad)], tokenizer="bytes"), tmp_path / "c", log=lambda s: None)


def test_corpus_shorter_than_one_sequence(tmp_path):
    for i in range(3):
        (tmp_path / f"t{i}.txt").write_text(f"tiny {i}")
    data = prepare_data(DataConfig(sources=[str(tmp_path)], tokenizer="bytes"), tmp_path / "c", log=lambda s: None)
    with pytest.raises(UsageError, match="too short.*fewer than one sequence"):
        check_length(data, seq_len=64)


def test_a_failed_build_leaves_no_cache_entry(corpus_dir, tmp_path, monkeypatch):
    calls = []

    def failing(self, texts):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return [list(t.encode()) for t in texts]

    monkeypatch.setattr(TextTokenizer, "encode_batch", failing)
    cfg = DataConfig(sources=[str(corpus_dir)], tokenizer="bytes")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_data(cfg, cache, log=lambda s: None)
    assert _cache_entries(cache) == []  # no entry and no temporary folder left
    data = prepare_data(cfg, cache, log=lambda s: None)
    assert len(data.train) > 0 and len(_cache_entries(cache)) == 1


def test_data_config_validation_names_the_field():
    with pytest.raises(ValueError, match="data.val_fraction"):
        DataConfig(val_fraction=0.0)
    with pytest.raises(ValueError, match="data.vocab_size"):
        DataConfig(vocab_size=100)


def test_a_killed_build_leaves_no_temp_folder_for_long(corpus_dir, tmp_path):
    """A build killed before its cleanup leaves .tmp-*; the next build removes those a day old
    and leaves younger ones alone (they may be a concurrent build's)."""
    cfg = DataConfig(sources=[str(corpus_dir)], tokenizer="bytes")
    first = prepare_data(cfg, tmp_path / "cache", log=lambda s: None)
    parent = first.path.parent
    old, young = parent / ".tmp-killed-1", parent / ".tmp-running-2"
    for p in (old, young):
        p.mkdir()
        (p / "train.bin").write_bytes(b"\0" * 64)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    (corpus_dir / "f00.txt").write_text("another version of the text, so the cache builds again " * 3)
    prepare_data(cfg, tmp_path / "cache", log=lambda s: None)
    assert not old.exists() and young.exists()


def test_a_cache_with_token_ids_beyond_the_vocabulary_is_rebuilt(corpus_dir, tmp_path):
    cfg = DataConfig(sources=[str(corpus_dir)], tokenizer="bytes")
    first = prepare_data(cfg, tmp_path / "cache", log=lambda s: None)
    good = np.array(first.train)
    damaged = good.copy()
    damaged[5] = 300  # bytes vocabulary: 257 ids; same size, so only the id check can tell
    damaged.tofile(first.path / "train.bin")
    logs = []
    again = prepare_data(cfg, tmp_path / "cache", log=logs.append)
    assert any("failed its check" in line for line in logs)
    assert np.array_equal(again.train, good) and int(again.train.max()) < again.tokenizer.vocab_size


def test_progress_lines_count_in_words(tmp_path):
    (tmp_path / "one.txt").write_text("just one document, long enough to hold a few sequences\n" * 20)
    (tmp_path / "bad.txt").write_bytes("caf\xe9".encode("latin-1"))
    logs = []
    prepare_data(DataConfig(sources=[str(tmp_path / "one.txt"), str(tmp_path / "bad.txt")], tokenizer="bytes"),
                 tmp_path / "cache", log=logs.append)
    assert logs[0].startswith("tokenizing 1 document (") and "skipped 1 file that" in logs[1]


def test_a_tokenizer_file_holding_a_list_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="is not a tokenizer file: it holds a JSON list"):
        load_tokenizer(tmp_path / "tokenizer.json")
