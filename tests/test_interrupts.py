"""Ctrl-C in every long phase: a real SIGINT to a real ``moekit`` process ends it with exit 130,
one line, and no half-written cache."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """About 12 MB of word-like text in 24 files: seconds of BPE training and tokenizing."""
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     \n", dtype=np.uint8)
    for i in range(24):
        (d / f"part{i:02d}.txt").write_bytes(letters[rng.integers(0, len(letters), 500_000)].tobytes())
    return d


def start(argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "moekit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd)


def interrupt_when(proc, needle: str, stream="stdout", timeout=300.0) -> float:
    """Read the process's lines until one holds ``needle``, then send SIGINT -> when it was sent."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    deadline = time.time() + timeout
    for line in pipe:
        if needle in line:
            break
        assert time.time() < deadline, f"no {needle!r} within {timeout}s"
    else:
        raise AssertionError(f"the process ended before {needle!r}: {proc.communicate()}")
    time.sleep(0.3)  # inside the phase, not at its first line
    proc.send_signal(signal.SIGINT)
    return time.time()


def finish(proc, sent: float) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert time.time() - sent < 60, "the interrupt waited for the phase to finish"
    assert "Traceback" not in err and "interrupted" in err
    return err


@pytest.mark.parametrize("phase, needle, tokenizer", [
    ("bpe training", "training a byte-level BPE tokenizer", "bpe"),
    # BPE, not bytes: the bytes tokenizer encodes these 12 MB in well under the 0.3 s the
    # interrupt waits on a quiet machine, so the phase finished (and was cached, correctly) first.
    ("tokenizing", "tokenizing", "bpe"),
])
def test_ctrl_c_while_preparing_data_exits_130_and_caches_nothing(big_corpus, tmp_path, phase, needle, tokenizer):
    cache, run = tmp_path / "cache", tmp_path / "run"
    proc = start(["train", "--data", str(big_corpus), "--tokenizer", tokenizer, "--vocab-size", "4000",
                  "--cache-dir", str(cache), "--out", str(run), "--max-steps", "1"], tmp_path)
    finish(proc, interrupt_when(proc, needle))
    if phase == "bpe training":  # (a tokenizer trained before the tokenizing phase is rightly cached)
        assert not list(cache.glob("tokenizers/*.json")), "a tokenizer from an interrupted training was cached"
    assert not (cache / "data").exists() or not any((cache / "data").iterdir()), "interrupted data was cached"
    assert not (run / "checkpoints").exists()


def test_ctrl_c_stops_an_experiment_instead_of_starting_the_next_variant(tmp_path):
    from moekit.data import default_corpus_root

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "heapq.py", "bisect.py"):
        (corpus / name).write_bytes((default_corpus_root() / name).read_bytes())
    out = tmp_path / "exp"
    proc = start(["experiment", "balancing", "--data", str(corpus), "--tokenizer", "bytes", "--seq-len", "8",
                  "--batch-size", "2", "--eval-batches", "1", "--steps", "100000", "--threads", "1",
                  "--out", str(out), "--cache-dir", str(tmp_path / "cache")], tmp_path)
    first = None
    deadline = time.time() + 300  # a busy 2-core machine
    while first is None and time.time() < deadline and proc.poll() is None:
        runs = sorted((out / "runs").glob("*/metrics.jsonl")) if (out / "runs").exists() else []
        first = runs[0].parent if runs and runs[0].stat().st_size else None
        time.sleep(0.2)
    assert first is not None, proc.communicate()
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    finish(proc, sent)
    assert [p.name for p in (out / "runs").iterdir()] == [first.name]  # no second variant started
    assert not (out / "results.md").exists()
    assert list((first / "checkpoints").glob("step-*"))  # the variant can resume


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from rich.console import Console

    from moekit import MoEConfig, ModelConfig
    from moekit.data import DataConfig, default_corpus_root
    from moekit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny-run")
    (root / "text").mkdir()
    for name in ("textwrap.py", "heapq.py", "bisect.py"):
        (root / "text" / name).write_bytes((default_corpus_root() / name).read_bytes())
    model = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=32, max_seq_len=64,
                        moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2))
    cfg = TrainConfig(data=DataConfig(sources=[str(root / "text")], tokenizer="bytes"), seq_len=64, batch_size=2,
                      max_steps=1, eval_batches=1, cache_dir=str(root / "run" / "cache"))  # inside: allowed
    train(cfg, model, root / "run", console=Console(quiet=True))
    return root / "run"


@pytest.mark.parametrize("argv, needle", [
    (["eval", "{run}", "--data", "{big}", "--batches", "1000000", "--batch-size", "64"], "validation tokens"),
    (["analyze", "{run}", "--data", "{big}", "--max-tokens", "10000000", "--out", "{tmp}/report"], "analyzing"),
])
def test_ctrl_c_during_evaluation_and_analysis_exits_130(tiny_run, big_corpus, tmp_path, argv, needle):
    argv = [a.format(run=tiny_run, big=big_corpus, tmp=tmp_path) for a in argv] + ["--threads", "1"] * (argv[0] == "eval")
    proc = start(argv, tmp_path)
    finish(proc, interrupt_when(proc, needle, stream="stderr"))
    assert not (tmp_path / "report").exists()  # no half-written report
