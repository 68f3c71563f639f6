"""The trainer: a short run that learns, exact resume, checkpoints, divergence, optimizer, schedule."""

import json
import shutil

import pytest
import torch
from rich.console import Console

from moekit import MoEConfig, ModelConfig, MoETransformer
from moekit.data import DataConfig, default_corpus_root
from moekit.errors import UsageError
from moekit.training import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    load_run,
    read_metrics,
    resume_run,
    train,
)
from moekit.training.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from moekit.training.optim import lr_at, param_groups

STDLIB_FILES = ("textwrap.py", "string.py", "colorsys.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py",
                "keyword.py", "glob.py", "calendar.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text (code, comments, docstrings): a few standard-library modules, about 150 KB."""
    d = tmp_path_factory.mktemp("corpus")
    for name in STDLIB_FILES:
        shutil.copy(default_corpus_root() / name, d / name)
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny_model(**moe) -> ModelConfig:
    # The noisy router and its jitter draw random numbers and the bias is a buffer that moves
    # every step: everything that exact resume must carry over.
    moe_cfg = dict(d_model=32, d_expert=32, num_experts=4, top_k=2, router="noisy", router_jitter=0.01,
                   bias_update_rate=1e-2, z_loss_coef=1e-3)
    moe_cfg.update(moe)
    return ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
                       moe=MoEConfig(**moe_cfg))


def tiny_train(corpus, cache, **kw) -> TrainConfig:
    base = dict(data=DataConfig(sources=[str(corpus)], tokenizer="bytes"), seq_len=32, batch_size=4, grad_accum=2,
                max_steps=20, lr=1e-2, warmup_steps=4, eval_every=5, eval_batches=2, ckpt_every=5, keep_last=2,
                cache_dir=str(cache))
    base.update(kw)
    return TrainConfig(**base)


def quiet() -> Console:
    return Console(quiet=True)


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


@pytest.fixture(scope="module")
def finished_run(corpus, cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    result = train(tiny_train(corpus, cache), tiny_model(), run_dir, console=quiet())
    return run_dir, result


def test_a_20_step_run_learns_and_writes_its_folder(finished_run):
    run_dir, result = finished_run
    assert result.status == "done" and result.step == 20
    assert result.final_val_loss < result.initial_val_loss - 0.8  # ln(257) = 5.55 at the start
    for name in ("config.json", "train_config.json", "tokenizer.json", "metrics.jsonl"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_recs, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    assert [r["step"] for r in train_recs] == list(range(1, 21))
    assert [r["step"] for r in evals] == [0, 5, 10, 15, 20]
    layer = evals[-1]["routing"][0]
    assert set(layer) >= {"tokens_per_expert", "max_violation", "dropped_fraction", "router_entropy", "dead_experts"}
    assert sum(layer["tokens_per_expert"]) == 2 * 2 * 4 * 32  # top-2 slots of every validation token
    assert read_metrics(run_dir, "end")[0]["status"] == "done"
    # keep_last=2 plus the best: here the last is the best
    assert [c.step for c in list_checkpoints(run_dir)] == [15, 20]
    assert json.loads((run_dir / "config.json").read_text())["vocab_size"] == 257


def test_tensorboard_mirrors_the_metrics(finished_run):
    """With tensorboard installed (a dev dependency), the run folder holds event files whose
    scalars equal the JSONL log's."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra; install .[dev]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = finished_run
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/val_loss", "routing/max_violation_layer0"} <= tags, tags
    train_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    expected = [(r["step"], r["loss"]) for r in read_metrics(run_dir, "train")]
    assert [s for s, _ in train_loss] == [s for s, _ in expected]
    assert [v for _, v in train_loss] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_load_run_gives_back_the_trained_model(finished_run):
    run_dir, result = finished_run
    run = load_run(run_dir)
    assert run.step == 20 and not run.model.training and run.tokenizer.kind == "bytes"
    batches = run.validation_batches(log=lambda s: None)
    assert len(batches) == 2 and batches[0].shape == (4, 33)
    assert evaluate(run.model, batches).loss == pytest.approx(result.final_val_loss, abs=1e-6)
    best = load_run(run_dir, "best")
    assert best.val_loss == min(r["val_loss"] for r in run.metrics("eval"))


def test_resume_is_exact(finished_run, corpus, cache, tmp_path):
    """20 steps straight == 10 steps, a checkpoint, a fresh process state, then 10 more."""
    straight_dir, _ = finished_run
    run_dir = tmp_path / "split"
    first = train(tiny_train(corpus, cache), tiny_model(), run_dir, console=quiet(), stop_after=10)
    assert first.status == "interrupted" and first.step == 10
    torch.manual_seed(999)  # resume must not depend on the global RNG it finds
    second = resume_run(run_dir, console=quiet())
    assert second.status == "done" and second.step == 20
    assert train_losses(run_dir) == train_losses(straight_dir)  # exactly, not approximately
    assert [r["step"] for r in read_metrics(run_dir, "train")] == list(range(1, 21))
    a, b = load_run(straight_dir).model.state_dict(), load_run(run_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any("expert_bias" in k for k in a) and not torch.equal(
        a["blocks.0.ffn.router.expert_bias"], torch.zeros(4))


def test_resume_rejects_changes_to_the_model_or_data(finished_run):
    run_dir, _ = finished_run
    with pytest.raises(UsageError, match="cannot change lr"):
        resume_run(run_dir, {"lr": 1.0}, console=quiet())


def test_a_new_run_refuses_a_folder_holding_a_run(finished_run, corpus, cache):
    run_dir, _ = finished_run
    with pytest.raises(UsageError, match="already holds a run"):
        train(tiny_train(corpus, cache), tiny_model(), run_dir, console=quiet())


@pytest.mark.parametrize("damage, needle", [
    ("truncate", "truncated or corrupt: model.safetensors"),
    ("flip", "corrupt: state.pt does not match its sha256"),
    ("no_meta", "incomplete or corrupt: unreadable meta.json"),
])
def test_corrupt_checkpoints_are_reported_and_never_loaded(finished_run, tmp_path, damage, needle):
    src, _ = finished_run
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir)
    ckpt = list_checkpoints(run_dir)[-1].path
    if damage == "truncate":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip":
        f = ckpt / "state.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        (ckpt / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=needle):
        load_run(run_dir)
    model = MoETransformer(json_model(run_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    with pytest.raises(CheckpointError, match=needle):
        resume_run(run_dir, console=quiet())
    verify_checkpoint(list_checkpoints(run_dir)[0].path)  # the older one is intact


def json_model(run_dir) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((run_dir / "config.json").read_text()))


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, cache, tmp_path, monkeypatch):
    from moekit.training import loop

    real_loss, calls = loop.lm_loss, []

    def poisoned(out, targets):
        parts = real_loss(out, targets)
        calls.append(torch.is_grad_enabled())  # evaluations run without grad: not counted
        if sum(calls) == 2 * 7:  # the 7th step's second micro-batch
            parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(loop, "lm_loss", poisoned)
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="at step 7.*the last good checkpoint is .*step-00000005") as err:
        train(tiny_train(corpus, cache, eval_every=100), tiny_model(), run_dir, console=quiet())
    assert err.value.step == 7
    assert [c.step for c in list_checkpoints(run_dir)] == [5]
    verify_checkpoint(run_dir / "checkpoints" / "step-00000005")
    end = read_metrics(run_dir, "end")[-1]
    assert end["status"] == "nonfinite" and end["step"] == 7 and end["loss"] is None


def test_weight_decay_skips_norms_biases_and_the_balancing_bias():
    cfg = tiny_model(router="softmax", router_jitter=0.0)
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "qkv_bias": True, "tie_embeddings": True})
    model = MoETransformer(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in n or n.endswith("bias") for n in kept) and any("norm" in n for n in kept)
    assert any(n.endswith("qkv.bias") or "bias" in n for n in kept)
    assert "blocks.0.ffn.experts.w_in" in decayed and "blocks.0.ffn.router.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # each once
    assert not any("expert_bias" in n for n in decayed | kept)
    assert "blocks.0.ffn.router.expert_bias" in dict(model.named_buffers())


def _one_step_deltas(corpus, cache, router_lr_mult: float) -> dict[str, torch.Tensor]:
    from moekit.training.loop import train_step
    from moekit.training.optim import build_optimizer, set_lr

    torch.manual_seed(0)
    model = MoETransformer(tiny_model(router="softmax", router_jitter=0.0, bias_update_rate=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = tiny_train(corpus, cache, router_lr_mult=router_lr_mult)
    opt = build_optimizer(model, cfg)
    set_lr(opt, 3e-3)
    batch = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(1))
    assert train_step(model, opt, [batch], cfg, 3e-3, torch.device("cpu")).finite
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_router_lr_mult_scales_the_routers_update_and_nothing_else(corpus, cache):
    """Adam's first step is lr x (normalized gradient + decay): with router_lr_mult 0.1 the
    routers move a tenth as far; every other parameter moves exactly as before."""
    plain, slow = _one_step_deltas(corpus, cache, 1.0), _one_step_deltas(corpus, cache, 0.1)
    routers = [n for n in plain if n.endswith("router.weight")]
    assert len(routers) == 2
    for n in plain:
        if n in routers:
            assert plain[n].abs().mean() > 1e-4
            torch.testing.assert_close(slow[n], 0.1 * plain[n], rtol=1e-3, atol=1e-9)
        else:
            torch.testing.assert_close(slow[n], plain[n], rtol=0, atol=0)


def test_router_lr_mult_groups_and_exact_resume(corpus, cache, tmp_path):
    model = MoETransformer(tiny_model(router="softmax", router_jitter=0.0, router_bias=True))
    groups = param_groups(model, 0.1, router_lr_mult=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    routed = [g for g in groups if g.get("lr_mult") == 0.5]
    assert sorted(names[id(p)] for g in routed for p in g["params"]) == sorted(
        n for n in names.values() if ".router." in n)
    assert [g["weight_decay"] for g in routed] == [0.1, 0.0]  # router weight decays, its bias not
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="router_lr_mult must be > 0"):
        TrainConfig(router_lr_mult=0.0)
    cfg = tiny_train(corpus, cache, router_lr_mult=0.5, max_steps=8, eval_every=4, ckpt_every=4)
    straight = train(cfg, tiny_model(), tmp_path / "straight", console=quiet())
    first = train(cfg, tiny_model(), tmp_path / "split", console=quiet(), stop_after=4)
    assert straight.status == "done" and first.status == "interrupted"
    assert resume_run(tmp_path / "split", console=quiet()).status == "done"
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, 0, cfg) == pytest.approx(0.1) and lr_at(9, 0, cfg) == pytest.approx(1.0)
    assert lr_at(10, 0, cfg) == pytest.approx(1.0)
    assert lr_at(60, 0, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(110, 0, cfg) == pytest.approx(0.1) and lr_at(500, 0, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, 0, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    timed = TrainConfig(lr=1.0, warmup_steps=10, max_steps=10_000, min_lr_ratio=0.1, time_budget=1.0)
    assert lr_at(20, 30.0, timed) == pytest.approx(0.55)  # half the budget spent: half-way down
    assert lr_at(20, 60.0, timed) == pytest.approx(0.1)


def test_bf16_autocast_keeps_the_router_in_fp32(corpus, cache, tmp_path):
    model = MoETransformer(ModelConfig.from_dict({**tiny_model().to_dict(), "vocab_size": 257}))
    seen = {}
    def record(name, get_dtype):
        def hook(module, inputs, output):  # returns None: the output is left alone
            seen[name] = get_dtype(output)
        return hook

    model.moe_layers()[0].router.register_forward_hook(record("router", lambda o: o.logits.dtype))
    model.lm_head.register_forward_hook(record("head", lambda o: o.dtype))
    from moekit.training.loop import train_step
    from moekit.training.optim import build_optimizer

    cfg = tiny_train(corpus, cache, precision="bf16")
    batch = torch.randint(0, 257, (4, 33))
    res = train_step(model, build_optimizer(model, cfg), [batch], cfg, 1e-3, torch.device("cpu"))
    assert res.finite and seen == {"router": torch.float32, "head": torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_train_config_validation_names_the_field():
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="unknown data field"):
        TrainConfig.from_dict({"data": {"vocab": 3}})
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_seq_len_longer_than_the_model_context_is_refused(corpus, cache, tmp_path):
    with pytest.raises(UsageError, match="exceeds the model's max_seq_len 32"):
        train(tiny_train(corpus, cache, seq_len=64), tiny_model(), tmp_path / "r", console=quiet())


def test_progress_bar_expects_the_steps_a_time_budget_allows():
    from moekit.training.report import Reporter

    budget = Reporter(Console(quiet=True), total_steps=1000, start_step=0, log_every=10, budget_s=240.0)
    assert budget.expected_steps({"step": 30, "elapsed": 24.0}) == 300  # 30 steps in a tenth of it
    assert budget.expected_steps({"step": 500, "elapsed": 60.0}) == 1000  # max_steps comes first
    assert budget.expected_steps({"step": 5, "elapsed": 0.0}) == 1000  # no pace yet
    steps = Reporter(Console(quiet=True), total_steps=1000, start_step=0, log_every=10)
    assert steps.expected_steps({"step": 30, "elapsed": 24.0}) == 1000


def test_log_lines_start_at_step_one_and_give_the_mean_rate_since_the_last_line():
    import io

    from moekit.training.report import Reporter

    out = io.StringIO()
    rep = Reporter(Console(file=out, width=80), total_steps=100, start_step=0, log_every=4)
    for step, seconds in zip(range(1, 9), (1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0)):
        rep.step({"step": step, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 100 / seconds}, 100, seconds)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "4", "8"]
    assert "100 tok/s (mean of 1 step)" in lines[0]
    assert "43 tok/s (mean of 3 steps)" in lines[1]  # 300 tokens in 7 s, not the last step's 20
    assert "100 tok/s (mean of 4 steps)" in lines[2]
