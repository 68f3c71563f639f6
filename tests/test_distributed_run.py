"""Whole training runs over several processes: ``train(..., parallel=...)`` in forked gloo
ranks, interrupted and resumed at another world size; and ``torchrun -m moekit train``."""

from __future__ import annotations

import io
import json
import os
import re
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


def _resume_ranks(rank: int, world: int, run_dir, pcfg: ParallelConfig) -> str:
    return resume_run(run_dir, console=_quiet(), parallel=pcfg).status


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """The uninterrupted single-process run every split run must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(_cfg(corpus), MODEL, run, console=_quiet())
    return run


def _assert_sharded(ckpt, world: int) -> None:
    """Each rank wrote its own file with torch.distributed.checkpoint; no consolidated copy."""
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["layout"] == "sharded" and meta["parallel"]["world"] == world
    assert not (ckpt / "model.safetensors").exists()
    assert sorted(f.name for f in (ckpt / "sharded").glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(world)]


def _assert_same_routing(split, straight, steps: int) -> None:
    """Rank 0 logs the global batch's routing (all-reduced expert loads), not its own half."""
    def records(run, kind):
        return [r for r in read_metrics(run, kind) if r["step"] <= steps]

    for got, want in zip(records(split, "train"), records(straight, "train"), strict=True):
        assert got["max_violation"] == pytest.approx(want["max_violation"], rel=1e-6, abs=1e-9)
    for got, want in zip(records(split, "eval"), records(straight, "eval"), strict=True):
        for g, w in zip(got["routing"], want["routing"], strict=True):
            assert g["tokens_per_expert"] == w["tokens_per_expert"] and g["dead_experts"] == w["dead_experts"]
            assert g["router_entropy"] == pytest.approx(w["router_entropy"], rel=1e-5)
            assert g["losses"] == pytest.approx(w["losses"], rel=1e-5)


@pytest.mark.parametrize("pcfg", [ParallelConfig(ep=2, balance_stats="global"),
                                  ParallelConfig(ep=2, fsdp=True, balance_stats="global"),
                                  ParallelConfig(balance_stats="global")],
                         ids=["ep", "ep+fsdp", "dp"])
def test_two_ranks_stop_then_one_resumes_like_a_straight_run(corpus, tmp_path, straight, pcfg):
    split = tmp_path / "split"
    assert run_ranks(_train_ranks, 2, _cfg(corpus), split, pcfg, 4, timeout=180) == ["interrupted"] * 2
    assert _losses(split) == pytest.approx(_losses(straight)[:4], rel=1e-5)
    _assert_same_routing(split, straight, 4)
    _assert_sharded(split / "checkpoints" / "step-00000004", world=2)
    # any single-process reader takes the sharded checkpoint: the weights are the straight run's
    from moekit.training.run import load_run

    got, want = load_run(split, 4).model.state_dict(), load_run(straight, 4).model.state_dict()
    for key, w in want.items():
        assert (got[key] - w).abs().max() <= 1e-4 * w.abs().max(), key  # float rounding of 4 steps
    result = resume_run(split, console=_quiet())  # world size 1 now
    assert result.status == "done" and result.step == 8
    assert _losses(split) == pytest.approx(_losses(straight), rel=1e-5)
    assert result.final_val_loss == pytest.approx(read_metrics(straight, "end")[-1]["val_loss"], rel=1e-5)


def test_two_ranks_stop_then_four_resume_like_a_straight_run(corpus, tmp_path, straight):
    """Sharded at EP 2 over 2 ranks, resharded to EP 4 + FSDP over 4: DCP reads each new piece
    from the old files; the run ends with the consolidated export."""
    split = tmp_path / "split"
    pcfg = ParallelConfig(ep=2, balance_stats="global")
    assert run_ranks(_train_ranks, 2, _cfg(corpus), split, pcfg, 4, timeout=180) == ["interrupted"] * 2
    _assert_sharded(split / "checkpoints" / "step-00000004", world=2)
    # a later checkpoint killed mid-write: its temporary folder is ignored, then removed
    killed = split / "checkpoints" / ".tmp-step-00000006-killed"
    shutil.copytree(split / "checkpoints" / "step-00000004", killed)
    (killed / "meta.json").unlink()
    wider = ParallelConfig(ep=4, fsdp=True, balance_stats="global")
    assert run_ranks(_resume_ranks, 4, split, wider, timeout=240) == ["done"] * 4
    assert not killed.exists()
    assert [r["step"] for r in read_metrics(split, "resume")] == [4]
    assert _losses(split) == pytest.approx(_losses(straight), rel=1e-5)
    final = split / "checkpoints" / "step-00000008"
    assert json.loads((final / "meta.json").read_text())["layout"] == "consolidated"
    assert (final / "model.safetensors").exists() and not (final / "sharded").exists()


def test_corrupt_shard_is_named(corpus, tmp_path):
    """A truncated shard file is caught by its checksum before anything loads."""
    from moekit.training.checkpoint import CheckpointError
    from moekit.training.run import load_run

    split = tmp_path / "split"
    pcfg = ParallelConfig(ep=2)
    assert run_ranks(_train_ranks, 2, _cfg(corpus, steps=4), split, pcfg, 2, timeout=180) == ["interrupted"] * 2
    shard = split / "checkpoints" / "step-00000002" / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="sharded/__1_0.distcp has .* bytes, expected"):
        load_run(split, 2)


def _torchrun(args: list[str], timeout: float = 240, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m moekit ...`` in its own session, killed whole on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
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


@pytest.mark.parametrize("args, message", [
    (["--ep", "3"], "--ep 3 does not divide the world size 2"),
    (["--ep", "2", "--set", "moe.num_experts=3"], "--ep 2 does not divide the number of experts 3"),
    (["--ep", "2", "--set", "moe.router=expert_choice", "--set", "moe.capacity_factor=1.0", "--set",
      "moe.bias_update_rate=0"],
     "expert parallelism does not support router='expert_choice'"),
], ids=["ep-world", "ep-experts", "expert-choice"])
def test_torchrun_bad_layout_is_one_line_from_rank_0(corpus, tmp_path, args, message):
    """Every rank finds the problem before any collective that could wait for another: one line
    from rank 0, exit 2 on every rank, no hang (the timeout would fail the test)."""
    r = _torchrun([*_train_args(corpus, tmp_path / "run"), *args, "--max-steps", "1"])
    ours = [line for line in r.stderr.splitlines() if line.startswith("moekit train: error:")]
    assert len(ours) == 1 and message in ours[0], r.stderr[-3000:]
    assert r.returncode != 0 and len(re.findall(r"exitcode\s*:\s*2\b", r.stderr)) >= 1
    assert not re.search(r'File ".*/moekit/', r.stderr)


def test_ep_without_torchrun_is_a_usage_error(corpus, tmp_path, capsys):
    from moekit.cli import main

    assert main([*_train_args(corpus, tmp_path / "run"), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error: --ep/--dp/--fsdp need several processes") and err.count("\n") == 1


def test_a_rank_other_than_0_waits_for_rank_0_to_say_what_is_wrong(monkeypatch, capsys):
    """torchrun stops all ranks at the first exit: with bad input, rank 1 must not exit before
    rank 0 has printed the one line (CI lost it once when rank 1 reached the check first)."""
    import moekit.cli

    slept: list[float] = []
    monkeypatch.setattr(moekit.cli.time, "sleep", slept.append)
    for rank, line, waits in (("1", "", [moekit.cli.RANK_ERROR_GRACE_S]), ("0", "moekit train: error: ", [])):
        monkeypatch.setenv("RANK", rank)
        slept.clear()
        assert moekit.cli.main(["train", "--set", "no_such_field=1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and bool(err) == bool(line) and slept == waits, (rank, err, slept)
    assert moekit.cli.RANK_ERROR_GRACE_S >= 1


def test_resume_at_a_world_size_that_cannot_split_the_batch(corpus, tmp_path):
    """A run sharded over 2 ranks reshards onto any world size that splits its global batch; one
    that does not (3 ranks, batch 4) is one line from rank 0, exit 2 on every rank, no hang."""
    split = tmp_path / "split"
    assert run_ranks(_train_ranks, 2, _cfg(corpus), split, ParallelConfig(ep=2), 2, timeout=180) == ["interrupted"] * 2
    r = _torchrun(["train", "--resume", str(split)], nproc=3)
    ours = [line for line in r.stderr.splitlines() if line.startswith("moekit train: error:")]
    assert ours == ["moekit train: error: --batch-size 4 (global) is not divisible by the world size 3: resume this "
                    "run with a world size that divides it (1, 2, 4)"]
    assert r.returncode != 0 and len(re.findall(r"exitcode\s*:\s*2\b", r.stderr)) >= 1, r.stderr[-2000:]
    assert not re.search(r'File ".*/moekit/', r.stderr)  # torchrun's own traceback only, none from a worker


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU: the NCCL path runs only there")
def test_torchrun_nccl_on_one_gpu(corpus, tmp_path):
    """The GPU path: torchrun with one process, --device auto picks cuda and so NCCL."""
    out = tmp_path / "run"
    args = [a if a != "cpu" else "auto" for a in _train_args(corpus, out)]
    r = _torchrun([*args, "--max-steps", "2"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on cuda" in r.stdout and [m["step"] for m in read_metrics(out, "train")] == [1, 2]


_LEAVE_SCRIPT = """
import torch.distributed as dist
from moekit.distributed.mesh import ParallelConfig, init_mesh, leave_process_group
if {own}:
    dist.init_process_group("gloo")
init_mesh(ParallelConfig(), 4, "cpu")
leave_process_group()
print("initialized after leaving:", dist.is_initialized())
"""


@pytest.mark.parametrize("own", [False, True], ids=["joined-by-moekit", "callers-group"])
def test_moekit_closes_only_the_process_group_it_joined(own):
    """A rank exiting with its gloo group alive can die with SIGABRT after its work is done
    (gloo threads outliving interpreter teardown): the CLI closes the group init_mesh joined;
    a group the caller created is the caller's to close."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _LEAVE_SCRIPT.format(own=own)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"initialized after leaving: {own}"
