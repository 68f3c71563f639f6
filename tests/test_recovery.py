"""Recovering from bad state on disk: a corrupt newest checkpoint, NaN/inf or misfit tensors, a
new learning rate after divergence, a damaged tokenizer cache, a foreign cache_dir, and an
out-of-memory step. Real checkpoints and caches on disk, damaged the way disks and kills do."""

import hashlib
import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from moekit import MoEConfig, ModelConfig, MoETransformer
from moekit.cli import main
from moekit.data import DataConfig, default_corpus_root, prepare_data
from moekit.training import CheckpointError, TrainConfig, load_run, read_metrics, resume_run, train
from moekit.training.checkpoint import list_checkpoints, load_checkpoint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "string.py", "heapq.py", "bisect.py"):
        shutil.copy(default_corpus_root() / name, d / name)
    return d


def tiny_model() -> ModelConfig:
    return ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16,
                       moe=MoEConfig(d_model=16, d_expert=16, num_experts=2, top_k=1))


def tiny_cfg(corpus, cache, **kw) -> TrainConfig:
    base = dict(data=DataConfig(sources=[str(corpus)], tokenizer="bytes"), seq_len=16, batch_size=2, max_steps=4,
                eval_every=2, eval_batches=1, ckpt_every=2, keep_last=3, cache_dir=str(cache))
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run4(corpus, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4; each test damages its own copy."""
    root = tmp_path_factory.mktemp("run4")
    train(tiny_cfg(corpus, root / "cache"), tiny_model(), root / "run", console=Console(quiet=True))
    return root / "run"


@pytest.fixture
def run(run4, tmp_path):
    shutil.copytree(run4, tmp_path / "run")
    return tmp_path / "run"


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_newest_checkpoint_names_the_intact_one_and_resume_takes_it(run, capsys):
    corrupt(run / "checkpoints" / "step-00000004" / "model.safetensors")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "step-00000004 is corrupt" in err and "the newest intact checkpoint is step 2: use --checkpoint 2" in err
    assert len(err.splitlines()) == 1
    assert main(["eval", str(run)]) == 2
    assert "use --checkpoint 2" in capsys.readouterr().err

    assert main(["train", "--resume", str(run), "--checkpoint", "2", "--max-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "step 2" in out
    assert [c.step for c in list_checkpoints(run)] == [2, 4]
    load_checkpoint(run / "checkpoints" / "step-00000004", MoETransformer(load_run(run).model_cfg))  # rewritten, intact
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4]
    assert list((run / "discarded").glob("step-00000004*"))  # the corrupt one kept aside, not deleted


def test_checkpoint_without_resume_is_refused(run, capsys):
    assert main(["train", "--checkpoint", "2", "--out", str(run.parent / "x")]) == 2
    assert "--checkpoint needs --resume" in capsys.readouterr().err


def rewrite_tensor(run, step, name, fn):
    f = run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"
    tensors = load_file(str(f))
    tensors[name] = fn(tensors[name])
    save_file(tensors, str(f))
    # keep meta.json's checksums true: the damage is in the values, not the file
    meta_path = f.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["model.safetensors"] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    meta_path.write_text(json.dumps(meta))


def test_nan_in_a_checkpoint_is_named_unless_the_check_is_skipped(run, capsys):
    def poison(t):
        t = t.clone()
        t.view(-1)[3] = float("nan")
        t.view(-1)[5] = float("inf")
        return t

    name = sorted(load_file(str(run / "checkpoints" / "step-00000004" / "model.safetensors")))[0]
    rewrite_tensor(run, 4, name, poison)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds 2 NaN/inf value"):
        load_run(run)
    assert main(["sample", str(run), "--max-new-tokens", "2"]) == 2
    assert f"tensor '{name}' holds 2 NaN/inf" in capsys.readouterr().err
    assert load_run(run, check_finite=False).step == 4
    assert main(["eval", str(run), "--no-check-finite", "--json"]) == 0


def test_a_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(run):
    rewrite_tensor(run, 4, "embed.weight", lambda t: torch.randn(300, t.shape[1]))
    with pytest.raises(CheckpointError, match=r"tensor 'embed.weight' has shape \[300, 16\] in the checkpoint "
                                              r"but \[257, 16\] in the model"):
        load_run(run)


def test_optimizer_settings_change_on_resume_only_when_asked_and_are_recorded(run, capsys):
    assert main(["train", "--resume", str(run), "--lr", "1e-4", "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "cannot change lr when resuming" in err and "--change-optimizer" in err
    assert main(["train", "--resume", str(run), "--lr", "1e-4", "--set", "beta2=0.99", "--max-steps", "6",
                 "--change-optimizer"]) == 0
    (rec,) = read_metrics(run, "resume")
    assert rec["step"] == 4 and rec["changed"] == {"lr": [2e-3, 1e-4], "beta2": [0.95, 0.99]}
    assert all(r["lr"] <= 1e-4 for r in read_metrics(run, "train") if r["step"] > 4)
    assert load_run(run).train_cfg.lr == 1e-4
    state = torch.load(list_checkpoints(run)[-1].path / "state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_a_damaged_cached_tokenizer_is_rebuilt(corpus, tmp_path):
    cfg = DataConfig(sources=[str(corpus)], tokenizer="bpe", vocab_size=300)
    logs = []
    first = prepare_data(cfg, tmp_path, log=logs.append)
    (cached,) = (tmp_path / "tokenizers").glob("*.json")
    cached.write_text(cached.read_text()[:100])  # cut short, as a full disk or a kill leaves it
    again = prepare_data(cfg, tmp_path, log=logs.append)
    assert any("cached tokenizer is unreadable" in line for line in logs)
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint  # the same training, the same result
    assert json.loads(cached.read_text())  # and the cache entry is whole again


def test_a_foreign_cache_dir_in_train_config_is_not_used(run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    cfg = json.loads((run / "train_config.json").read_text())
    cfg["cache_dir"] = str(elsewhere)
    (run / "train_config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(run), "--batches", "1"]) == 0
    err = capsys.readouterr().err
    assert f"names cache_dir {elsewhere}, outside the run folder" in err
    assert not elsewhere.exists()
    inside = run / "cache"  # inside the run folder: honoured
    cfg["cache_dir"] = str(inside)
    (run / "train_config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(run), "--batches", "1"]) == 0
    assert "outside the run folder" not in capsys.readouterr().err and (inside / "data").is_dir()


def test_an_out_of_memory_step_is_named_and_leaves_the_run_consistent(corpus, tmp_path, capsys):
    from moekit.training.loop import OutOfMemoryStop, next_token_loss

    steps = []

    def greedy(out, batch):  # the trainer's loss seam: the third step asks for memory no machine has
        steps.append(1)
        if len(steps) == 3:
            torch.empty(1 << 62, dtype=torch.uint8)  # a real allocation, failing in the real allocator
        return next_token_loss(out, batch)

    run = tmp_path / "oom"
    with pytest.raises(OutOfMemoryStop, match=r"out of memory at step 3 \(batch 2 x 16 tokens, grad_accum 1, .*"
                                              r"--batch-size 1 --grad-accum 2; the last good checkpoint is .*step-00000002"):
        train(tiny_cfg(corpus, tmp_path / "cache", eval_every=100), tiny_model(), run, console=Console(quiet=True),
              loss_fn=greedy)
    assert [c.step for c in list_checkpoints(run)] == [2]
    end = read_metrics(run, "end")[-1]
    assert end["status"] == "oom" and end["step"] == 3 and "can't allocate memory" in end["error"]
    assert resume_run(run, {"max_steps": 3}, console=Console(quiet=True)).step == 3  # nothing to repair
