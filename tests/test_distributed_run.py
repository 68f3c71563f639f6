"""Whole training runs over several processes: ``train(..., parallel=...)`` in forked gloo
ranks, interrupted and resumed at another world size; and ``torchrun -m moekit train``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from rich.console import Console

from dist_harness import free_port, run_ranks
from moekit.config import ModelConfig, MoEConfig
from moekit.data import default_corpus_root
from moekit.data.dataset import DataConfig
from moekit.distributed.mesh import ParallelConfig
from moekit.training import read_metrics
from moekit.training.config import TrainConfig
from moekit.training.loop import resume_run, train

pytestmark = pytest.mark.distributed

MODEL = ModelConfig(vocab_size=256, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32,
                    moe=MoEConfig(d_model=16, d_expert=16, num_experts=4, top_k=2, bias_update_rate=0.01))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus").mkdir()
    for name in ("textwrap.py", "string.py", "colorsys.py", "bisect.py"):
        shutil.copy(default_corpus_root() / name, root / "corpus" / name)
    (root / "model.json").write_text(json.dumps(MODEL.to_dict()))
    return root


def _cfg(corpus, steps: int = 8) -> TrainConfig:
    return TrainConfig(data=DataConfig(sources=[str(corpus / "corpus")], tokenizer="bytes"), seq_len=16,
                       batch_size=4, max_steps=steps, lr=1e-2, warmup_steps=2, eval_every=4, eval_batches=2,
                       ckpt_every=4, cache_dir=str(corpus / "cache"), device="cpu")


def _quiet() -> Console:
    return Console(file=io.StringIO())


def _train_ranks(rank: int, world: int, cfg: TrainConfig, run_dir, pcfg: ParallelConfig, stop_after: int) -> str:
    return train(cfg, MODEL, run_dir, console=_quiet(), stop_after=stop_after, parallel=pcfg).status


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


@pytest.mark.parametrize("pcfg", [ParallelConfig(ep=2, balance_stats="global"),
                                  ParallelConfig(ep=2, fsdp=True, balance_stats="global"),
                                  ParallelConfig(balance_stats="global")],
                         ids=["ep", "ep+fsdp", "dp"])
def test_two_ranks_stop_then_one_resumes_like_a_straight_run(corpus, tmp_path, pcfg):
    straight = tmp_path / "straight"
    train(_cfg(corpus), MODEL, straight, console=_quiet())
    split = tmp_path / "split"
    assert run_ranks(_train_ranks, 2, _cfg(corpus), split, pcfg, 4, timeout=180) == ["interrupted"] * 2
    assert _losses(split) == pytest.approx(_losses(straight)[:4], rel=1e-5)
    result = resume_run(split, console=_quiet())  # world size 1 now
    assert result.status == "done" and result.step == 8
    assert _losses(split) == pytest.approx(_losses(straight), rel=1e-5)
    assert result.final_val_loss == pytest.approx(read_metrics(straight, "end")[-1]["val_loss"], rel=1e-5)


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m moekit ...`` in its own session, killed whole on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "moekit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail(f"torchrun still running after {timeout} s: a hang")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _train_args(corpus, out) -> list[str]:
    return ["train", "--preset", str(corpus / "model.json"), "--data", str(corpus / "corpus"), "--tokenizer", "bytes", "--seq-len", "16", "--batch-size", "4", "--cache-dir",
            str(corpus / "cache"), "--eval-batches", "1", "--device", "cpu", "--out", str(out)]


def test_torchrun_expert_parallel_train(corpus, tmp_path):
    out = tmp_path / "run"
    r = _torchrun([*_train_args(corpus, out), "--ep", "2", "--max-steps", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("final validation loss") == 1  # rank 0 alone reports
    assert [m["step"] for m in read_metrics(out, "train")] == [1, 2]
    assert (out / "checkpoints" / "step-00000002" / "model.safetensors").exists()


def test_torchrun_bad_ep_is_one_line_from_rank_0(corpus, tmp_path):
    r = _torchrun([*_train_args(corpus, tmp_path / "run"), "--ep", "3"])
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("moekit train: error:")]
    assert ours == ["moekit train: error: --ep 3 does not divide the world size 2"]


def test_ep_without_torchrun_is_a_usage_error(corpus, tmp_path, capsys):
    from moekit.cli import main

    assert main([*_train_args(corpus, tmp_path / "run"), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error: --ep/--dp/--fsdp need several processes") and err.count("\n") == 1
