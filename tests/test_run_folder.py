"""Where a run may be written: never into a foreign folder, fresh records for a fresh run, no
leftovers of killed checkpoint writes, one trainer per folder. Real files, real subprocesses."""

import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
from rich.console import Console

from moekit import MoEConfig, ModelConfig
from moekit.data import DataConfig, default_corpus_root
from moekit.errors import UsageError
from moekit.training import TrainConfig, read_metrics, resume_run, train
from moekit.training.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "string.py", "heapq.py", "bisect.py"):
        shutil.copy(default_corpus_root() / name, d / name)
    return d


def tiny_model() -> ModelConfig:
    return ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16,
                       moe=MoEConfig(d_model=16, d_expert=16, num_experts=2, top_k=1))


def tiny_cfg(corpus, tmp_path, **kw) -> TrainConfig:
    base = dict(data=DataConfig(sources=[str(corpus)], tokenizer="bytes"), seq_len=16, batch_size=2, max_steps=2,
                eval_every=2, eval_batches=1, ckpt_every=2, cache_dir=str(tmp_path / "cache"))
    return TrainConfig(**{**base, **kw})


def snapshot(folder):
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def hf_like_folder(tmp_path):
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["MixtralForCausalLM"], "hidden_size": 4096}\n')
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    return folder


def moekit_cli(*argv, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "moekit", *argv], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def test_train_refuses_a_foreign_folder_and_touches_nothing(corpus, tmp_path):
    folder = hf_like_folder(tmp_path)
    before = snapshot(folder)
    proc = moekit_cli("train", "--data", str(corpus), "--tokenizer", "bytes", "--max-steps", "1",
                      "--cache-dir", str(tmp_path / "cache"), "--out", str(folder))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "is not empty and not a moekit run folder (it holds config.json, tokenizer.json)" in proc.stderr
    assert snapshot(folder) == before
    assert not (tmp_path / "cache").exists()  # refused before the data was even read

    file = tmp_path / "a-file"
    file.write_text("x")
    proc = moekit_cli("train", "--data", str(corpus), "--out", str(file), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and file.read_text() == "x"


def test_an_empty_folder_is_accepted_and_the_summary_prints_its_paths_whole(corpus, tmp_path):
    import io

    run = tmp_path / ("a-long-folder-name-" * 4) / "empty"
    run.mkdir(parents=True)
    log = io.StringIO()  # a log file: not a terminal, 80 columns
    result = train(tiny_cfg(corpus, tmp_path), tiny_model(), run, console=Console(file=log, width=80))
    assert result.step == 2
    assert f"checkpoint {run}/checkpoints/step-00000002\n" in log.getvalue()
    assert f"plot {run}/loss.png\n" in log.getvalue()
    assert "evaluating the untrained model on 1 validation batch(es) of 2 x 16 tokens" in log.getvalue()
    assert "CPU thread(s)" in log.getvalue()


def test_a_fresh_run_over_one_that_died_early_starts_fresh_records(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(corpus, tmp_path), tiny_model(), run, console=Console(quiet=True))
    # What a run that died before its first checkpoint leaves: configs and records, no checkpoint.
    shutil.rmtree(run / "checkpoints")
    old_records = sorted(p.name for p in run.iterdir() if p.name in ("metrics.jsonl", "loss.png")
                         or p.name.startswith("events"))
    assert "metrics.jsonl" in old_records
    train(tiny_cfg(corpus, tmp_path), tiny_model(), run, console=Console(quiet=True))
    records = read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2]  # one step-0 evaluation, not two
    assert [r["kind"] for r in records].count("end") == 1
    (aside,) = run.glob("previous-*")
    assert sorted(p.name for p in aside.iterdir()) == old_records
    assert len(list(run.glob("events.out.tfevents.*"))) <= 1


def test_stale_temporary_checkpoints_are_removed_on_resume(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(corpus, tmp_path), tiny_model(), run, console=Console(quiet=True))
    # A checkpoint write killed halfway (kill -9): its temporary folder with a partial file.
    stale = run / "checkpoints" / ".tmp-step-00000004-k1ll3d_x"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    foreign = run / "checkpoints" / "my-notes"  # not moekit's: left alone
    foreign.mkdir()
    resume_run(run, {"max_steps": 4}, console=Console(quiet=True))
    assert not stale.exists() and foreign.exists()
    assert [c.step for c in list_checkpoints(run)] == [2, 4]


def test_a_second_trainer_in_the_same_folder_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(corpus, tmp_path), tiny_model(), run, console=Console(quiet=True))
    stale = run / "checkpoints" / ".tmp-step-00000004-l1ve0000"
    stale.mkdir()
    fd = os.open(run, os.O_RDONLY)  # what a live trainer holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match="another moekit process is training in"):
            resume_run(run, {"max_steps": 4}, console=Console(quiet=True))
        assert stale.exists()  # a live writer's folder is never removed
    finally:
        os.close(fd)
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 2


def test_a_data_cache_inside_the_new_run_folder_is_allowed(corpus, tmp_path):
    run = tmp_path / "run"  # the cache appears in it during data preparation, before the run claims it
    result = train(tiny_cfg(corpus, tmp_path, cache_dir=str(run / "cache")), tiny_model(), run,
                   console=Console(quiet=True))
    assert result.step == 2 and (run / "cache" / "data").is_dir()
