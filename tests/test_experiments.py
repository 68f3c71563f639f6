"""Experiments: the variants match what they claim (equal active or total parameters), the
interpolation of "tokens to reach a loss", and the runner's plumbing at a tiny scale."""

import dataclasses
import json
import shutil

import pytest

from moekit import MoEConfig, ModelConfig
from moekit.accounting import count_params
from moekit.cli import main
from moekit.data import DataConfig, default_corpus_root
from moekit.errors import UsageError
from moekit.experiments import EXPERIMENTS, Variant, run_experiment, tokens_to_reach
from moekit.experiments.runner import steps_for_minutes
from moekit.training import TrainConfig
from cli_helpers import usage_error


def by_name(experiment: str) -> dict[str, ModelConfig]:
    return {v.name: v.model for v in EXPERIMENTS[experiment].variants()}


def routed_width(cfg: ModelConfig) -> int:
    """FFN hidden units a token passes through: routed k * d_expert plus shared."""
    return cfg.d_ff if cfg.moe is None else cfg.moe.top_k * cfg.moe.d_expert + cfg.moe.shared_width


def test_dense_vs_moe_matches_active_and_total_parameters():
    v = by_name("dense-vs-moe")
    assert routed_width(v["tiny-dense"]) == routed_width(v["tiny-moe"]) == 1024
    moe, dense_total = count_params(v["tiny-moe"]), count_params(v["dense-total"])
    router = 4 * 8 * 256  # the only parameters tiny-moe has beyond the wide dense model
    assert moe.total - dense_total.total == router
    assert count_params(v["tiny-moe"]).active - count_params(v["tiny-dense"]).active == router


def test_top_k_variants_have_equal_active_width():
    v = by_name("top-k")
    assert [routed_width(c) for c in v.values()] == [1024, 1024, 1024]
    assert [(c.moe.top_k, c.moe.num_experts) for c in v.values()] == [(1, 8), (2, 8), (8, 64)]
    assert all(c.moe.capacity_factor is None for c in v.values())


def test_balancing_and_capacity_variants():
    b = by_name("balancing")
    assert (b["no-balancing"].moe.load_balance_coef, b["no-balancing"].moe.bias_update_rate) == (0.0, 0.0)
    assert b["switch-aux"].moe.load_balance_coef > 0 and b["switch-aux"].moe.bias_update_rate == 0
    assert b["aux-free"].moe.load_balance_coef == 0 and b["aux-free"].moe.bias_update_rate > 0
    assert [c.moe.capacity_factor for c in by_name("capacity").values()] == [1.0, 1.25, 2.0, None]


def test_tokens_to_reach_interpolates_the_first_crossing():
    pts = [dict(tokens=0, val_loss=5.0), dict(tokens=100, val_loss=4.0), dict(tokens=200, val_loss=3.0),
           dict(tokens=300, val_loss=3.5)]
    assert tokens_to_reach(pts, 3.5) == pytest.approx(150.0)
    assert tokens_to_reach(pts, 4.0) == 100.0
    assert tokens_to_reach(pts, 6.0) == 0.0
    assert tokens_to_reach(pts, 2.0) is None


def test_steps_for_minutes():
    cfg = TrainConfig(eval_batches=3)  # 9 evaluations of 3 batches ~ 9 step-equivalents per variant
    assert steps_for_minutes([1.0, 2.0], 1.0, cfg) == 11  # (60 - 9 * 3) / 3
    assert steps_for_minutes([100.0], 1.0, cfg) == 2  # never fewer than 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "colorsys.py", "bisect.py", "heapq.py", "fnmatch.py"):
        shutil.copy(default_corpus_root() / name, d / name)
    return d


def tiny_variants() -> list[Variant]:
    moe = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
                      moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2, capacity_factor=1.0))
    return [Variant("dense", "a dense baseline", dataclasses.replace(moe, moe=None)), Variant("moe", "an MoE", moe)]


def test_runner_plumbing_and_reuse(corpus, tmp_path):
    cfg = TrainConfig(data=DataConfig(sources=[str(corpus)], tokenizer="bytes"), seq_len=16, batch_size=2,
                      eval_batches=1, warmup_steps=1, cache_dir=str(tmp_path / "cache"))
    logs: list[str] = []
    out = tmp_path / "exp"
    result = run_experiment("dense-vs-moe", out, cfg, steps=4, variants=tiny_variants(), log=logs.append)
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.json", "loss.png", "routing.png", "runs"}
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "moe"]
    assert all(r["tokens"] == 4 * 32 and r["steps"] == 4 for r in rows)  # equal tokens per variant
    assert rows[0]["max_violation"] is None and rows[1]["max_violation"] is not None
    assert rows[1]["dropped_fraction"] >= 0 and rows[0]["tokens_to_baseline_loss"] == pytest.approx(128.0)
    flops = [v["points"][-1]["flops"] for v in result["variants"]]
    assert flops[0] == pytest.approx(rows[0]["train_flops_per_token"] * 128)
    assert "tokens to reach dense's final loss" in (out / "results.md").read_text()
    # A second call reuses the finished runs; different settings for the same folders are refused.
    logs.clear()
    run_experiment("dense-vs-moe", out, cfg, steps=4, variants=tiny_variants(), log=logs.append)
    assert sum("reusing" in line for line in logs) == 2
    with pytest.raises(UsageError, match="--overwrite"):
        run_experiment("dense-vs-moe", out, cfg, steps=3, variants=tiny_variants(), log=logs.append)


def test_runner_resumes_an_interrupted_variant(corpus, tmp_path):
    from rich.console import Console

    from moekit.experiments.runner import variant_config
    from moekit.training import read_metrics, train

    cfg = TrainConfig(data=DataConfig(sources=[str(corpus)], tokenizer="bytes"), seq_len=16, batch_size=2,
                      eval_batches=1, warmup_steps=1, cache_dir=str(tmp_path / "cache"))
    out, variants = tmp_path / "exp", tiny_variants()[1:]
    train(variant_config(cfg, 4), variants[0].model, out / "runs" / "moe", console=Console(quiet=True), stop_after=2)
    logs: list[str] = []
    result = run_experiment("balancing", out, cfg, steps=4, variants=variants, log=logs.append)
    assert any(line.startswith("resuming moe") for line in logs)
    assert result["rows"][0]["steps"] == 4 and read_metrics(out / "runs" / "moe", "end")[-1]["status"] == "done"


_KILLABLE = """
import dataclasses, sys
import torch
from moekit import MoEConfig, ModelConfig
from moekit.data import DataConfig
from moekit.experiments import Variant, run_experiment
from moekit.training import TrainConfig
moe = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
                  moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2, capacity_factor=1.0))
cfg = TrainConfig(data=DataConfig(sources=[sys.argv[1]], tokenizer="bytes"), seq_len=16, batch_size=2,
                  eval_batches=1, warmup_steps=1, cache_dir=sys.argv[3])
torch.set_num_threads(1)
run_experiment("balancing", sys.argv[2], cfg, steps=int(sys.argv[4]), variants=[Variant("moe", "an MoE", moe)],
               log=print)
"""


def test_a_killed_variant_resumes_from_its_periodic_checkpoint_to_the_same_result(corpus, tmp_path):
    """SIGKILL (a reboot, an OOM: no Ctrl-C checkpoint) after the step-100 checkpoint of a 230-step
    variant: the rerun resumes from it and ends where an uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from moekit.experiments.runner import variant_config
    from moekit.training import read_metrics

    assert variant_config(TrainConfig(), 230).ckpt_every == 100 and variant_config(TrainConfig(), 1953).ckpt_every == 195
    script, cache = tmp_path / "exp.py", str(tmp_path / "cache")
    script.write_text(_KILLABLE)
    run = lambda out: [sys.executable, str(script), str(corpus), str(out), cache, "230"]  # noqa: E731
    subprocess.run(run(tmp_path / "whole"), check=True, timeout=300, capture_output=True)  # and the data cache
    killed = tmp_path / "killed"
    proc = subprocess.Popen(run(killed), stdout=subprocess.DEVNULL)
    ckpt, deadline = killed / "runs" / "moe" / "checkpoints" / "step-00000100", time.monotonic() + 240
    try:
        while not ckpt.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ckpt.is_dir() and proc.poll() is None, "the run ended or stalled before its step-100 checkpoint"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert not read_metrics(killed / "runs" / "moe", "end")  # it died without ending
    logs = subprocess.run(run(killed), check=True, timeout=300, capture_output=True, text=True).stdout
    assert "resuming moe" in logs and "training moe" not in logs
    ends = [read_metrics(out / "runs" / "moe", "end")[-1] for out in (tmp_path / "whole", killed)]
    assert ends[0]["status"] == ends[1]["status"] == "done" and ends[1]["step"] == 230
    assert ends[1]["val_loss"] == ends[0]["val_loss"]  # bit-identical: resume is exact


def test_a_finished_run_is_reused_whatever_its_checkpoint_and_log_intervals(corpus, tmp_path):
    """ckpt_every, keep_last and log_every say how a run was carried out, not what it computed
    (runs finished before checkpoints became periodic stay reusable); any other field is a new run."""
    cfg = TrainConfig(data=DataConfig(sources=[str(corpus)], tokenizer="bytes"), seq_len=16, batch_size=2,
                      eval_batches=1, warmup_steps=1, cache_dir=str(tmp_path / "cache"))
    out, variants = tmp_path / "exp", tiny_variants()[1:]
    run_experiment("balancing", out, cfg, steps=4, variants=variants, log=lambda s: None)
    saved = out / "runs" / "moe" / "train_config.json"
    d = json.loads(saved.read_text())
    saved.write_text(json.dumps({**d, "ckpt_every": 1, "keep_last": 3, "log_every": 2}))
    logs: list[str] = []
    run_experiment("balancing", out, cfg, steps=4, variants=variants, log=logs.append)
    assert f"reusing the finished run {out / 'runs' / 'moe'}" in logs
    assert not any(x.startswith(("training", "resuming")) for x in logs)
    saved.write_text(json.dumps({**d, "warmup_steps": 2}))
    with pytest.raises(UsageError, match="different run"):
        run_experiment("balancing", out, cfg, steps=4, variants=variants, log=logs.append)


def test_experiment_cli_with_calibrated_budget(corpus, tmp_path, capsys):
    out = tmp_path / "bal"
    assert main(["experiment", "balancing", "--data", str(corpus), "--tokenizer", "bytes", "--seq-len", "8",
                 "--batch-size", "1", "--eval-batches", "1", "--minutes", "0.02", "--threads", "1",
                 "--set", "warmup_steps=1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in res["rows"]] == ["no-balancing", "switch-aux", "aux-free", "aux-free-1e-2"]
    assert len({r["tokens"] for r in res["rows"]}) == 1 and res["steps"] >= 2
    assert "moekit experiment balancing --minutes 0.02" in res["command"]
    assert "aux-free" in capsys.readouterr().out


def test_select_variants_keeps_the_experiments_order_and_adds_what_the_chosen_build_on():
    from moekit.experiments.registry import select_variants

    knobs = EXPERIMENTS["moe-knobs"].variants()
    chosen, added = select_variants(knobs, ["x2-router-0.3x", "tiny-moe"])
    assert [v.name for v in chosen] == ["tiny-moe", "x2-router-0.3x"] and added == []
    assert chosen[1] == next(v for v in knobs if v.name == "x2-router-0.3x")  # the variant itself, unchanged
    chosen, added = select_variants(EXPERIMENTS["upcycle"].variants(), ["upcycled-copy"])
    assert [v.name for v in chosen] == ["dense", "upcycled-copy"] and added == ["dense"]
    chosen, added = select_variants(EXPERIMENTS["distill"].variants(), ["init-distilled", "baseline"])
    assert [v.name for v in chosen] == ["teacher", "baseline", "init-distilled"] and added == ["teacher"]


def test_experiment_cli_trains_only_the_chosen_variants(corpus, tmp_path, capsys):
    out = tmp_path / "bal"
    assert main(["experiment", "balancing", "--variants", "aux-free,no-balancing", "--data", str(corpus),
                 "--tokenizer", "bytes", "--seq-len", "8", "--batch-size", "1", "--eval-batches", "1",
                 "--steps", "2", "--threads", "1", "--set", "warmup_steps=1", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in res["rows"]] == ["no-balancing", "aux-free"]  # the experiment's order
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["aux-free", "no-balancing"]
    assert "--variants aux-free,no-balancing" in res["command"]
    assert "tokens to reach no-balancing's final loss" in (out / "results.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["experiment", "balancing", "--variants", "aux-free,nope"], "no variant 'nope' in this experiment; its variants: "
                                                                   "no-balancing, switch-aux"),
    (["experiment", "balancing", "--variants", "aux-free,aux-free"], "names a variant twice"),
    (["experiment", "balancing", "--variants", "aux-free,"], "an empty variant name"),
    (["experiment", "upcycle", "--variants", "dense"], "only stages"),
    (["experiment", "no-such"], "invalid choice"),
    (["experiment", "balancing", "--steps", "0"], "--steps must be >= 1"),
    (["experiment", "balancing", "--scale", "0"], "must be > 0"),
    (["experiment", "balancing", "--set", "moe.top_k=1"], "training fields only"),
    (["experiment", "balancing", "--threads", "0"], "--threads must be >= 1"),
    (["experiment", "balancing", "--data", "/no/such/corpus"], "/no/such/corpus"),
])
def test_experiment_bad_input_exits_2(tmp_path, capsys, args, message):
    assert message in usage_error(args + ["--out", str(tmp_path / "o")], capsys)


def _curve(name, scale, dropped):
    points = [dict(step=s, tokens=s * 4096, flops=s * 3e10 * scale, train_seconds=s * 0.5 * scale,
                   val_loss=9 - s / 10, max_violation=0.5 / s, dead_experts=0, dropped_fraction=dropped)
              for s in range(10, 140, 10)]
    return dict(name=name, moe=True, points=points)


def _tick_labels_overlap(fig, ax) -> int:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
             if t.get_visible() and t.get_text()]
    return sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_log_scale_tick_labels_of_the_loss_plot_do_not_overlap():
    from moekit.experiments.results import loss_figure

    # FLOPs from 3e11 to 4.2e12: just over a decade, where matplotlib labels 2x10^11, 3x10^11, ...
    result = dict(experiment="x", steps=130, tokens_per_step=4096, variants=[_curve("a", 1.0, 0.0), _curve("b", 0.8, 0.0)])
    fig = loss_figure(result)
    for ax in fig.axes:
        assert _tick_labels_overlap(fig, ax) == 0
        assert len([t for t in ax.get_xticklabels() if t.get_text()]) >= 2


def test_routing_panels_start_at_zero_and_an_all_zero_panel_is_not_centred_on_it():
    from moekit.experiments.results import routing_figure

    fig = routing_figure([_curve("a", 1.0, 0.0), _curve("b", 1.0, 0.0)])
    violation, dead, dropped = fig.axes
    assert dropped.get_ylim() == (0.0, 1.0) and dead.get_ylim() == (0.0, 1.0)
    assert violation.get_ylim()[0] == 0.0 and violation.get_ylim()[1] > 0.05
