"""Learning-rate sweeps and the scaling experiment (issue 20): a sweep picks the lowest-loss
learning rate where the answer is known; the chosen one trains every seed and a seed changes
nothing else; budgets resume; the report's speed-ups and its sanity check, both ways."""

import dataclasses
import json
import math

import pytest
from rich.console import Console
from test_experiments import corpus, tiny_variants  # noqa: F401 (fixture)
from test_experiments_stages import small

from moekit.cli import main
from moekit.data import DataConfig
from moekit.experiments import EXPERIMENTS, run_experiment
from moekit.experiments.scaling import budget_folder, parse_tokens, run_scaling, tokens_label
from moekit.experiments.scaling_report import budget_rows, build_report, render_markdown, speedup_across_budgets
from moekit.experiments.sweep import SweepConfig, pick_lr
from moekit.presets import get_preset
from moekit.training import TrainConfig
from cli_helpers import usage_error


@pytest.fixture
def cfg(corpus, tmp_path):  # noqa: F811
    return TrainConfig(data=DataConfig(sources=[str(corpus)], tokenizer="bytes"), seq_len=8, batch_size=2,
                       eval_batches=1, warmup_steps=1, cache_dir=str(tmp_path / "cache"))


def quiet(**kw):
    return dict(console=Console(quiet=True), log=kw.pop("log", lambda s: None), **kw)


def test_the_scaling_variants_spend_equal_active_width():
    v = {x.name: x.model for x in EXPERIMENTS["scaling"].variants()}
    assert list(v) == ["tiny-dense", "tiny-moe", "fine-grained", "dense-total"]
    moe, fine = v["tiny-moe"].moe, v["fine-grained"].moe
    assert v["tiny-dense"].d_ff == moe.top_k * moe.d_expert == fine.top_k * fine.d_expert + fine.shared_width == 1024
    assert (moe.num_experts, moe.top_k, fine.num_experts, fine.top_k, fine.num_shared_experts) == (8, 2, 64, 8, 1)
    assert v["dense-total"].d_ff == moe.num_experts * moe.d_expert and v["tiny-moe"] == get_preset("tiny-moe")
    exp = EXPERIMENTS["scaling"]
    assert exp.budgets == (500_000, 2_000_000, 8_000_000) and exp.check == ("dense-total", "tiny-dense")


def test_init_scale_pairs_differ_in_the_routed_scaling_factor_alone():
    base, x2 = (v.model for v in EXPERIMENTS["init-scale"].variants())
    assert base == get_preset("tiny-moe") and x2.moe.routed_scaling_factor == 2.0
    assert dataclasses.replace(x2, moe=dataclasses.replace(x2.moe, routed_scaling_factor=1.0)) == base


def test_moe_knobs_each_change_one_default_of_tiny_moe():
    """Each variant is tiny-moe with one knob turned; the baseline is the preset itself."""
    from moekit.training.config import TrainConfig

    base = get_preset("tiny-moe")
    variants = EXPERIMENTS["moe-knobs"].variants()
    assert variants[0].name == "tiny-moe" and variants[0].model == base and not variants[0].train
    by_name = {v.name: v for v in variants}
    both = by_name.pop("x2-router-0.3x")  # the combination of two single changes
    assert both.model == by_name["output-x2"].model and both.train == by_name["router-lr-0.3x"].train
    for v in list(by_name.values())[1:]:
        model_diff = {k for k, val in v.model.moe.to_dict().items() if base.moe.to_dict()[k] != val}
        train_diff = set(v.train)
        assert len(model_diff) + len(train_diff) == 1, (v.name, model_diff, train_diff)
        assert dataclasses.replace(v.model, moe=base.moe) == base
        TrainConfig.from_dict({**TrainConfig().to_dict(), **v.train})  # a valid change


def test_pick_lr_takes_the_lowest_finite_loss():
    assert pick_lr({1e-3: 5.0, 3e-3: 4.5, 1e-2: 4.7}) == 3e-3
    assert pick_lr({1e-3: 5.0, 3e-3: math.nan, 1e-2: math.inf, 3e-2: None}) == 1e-3  # diverged or missing
    assert pick_lr({1e-3: 4.5, 3e-4: 4.5}) == 3e-4  # a tie: the smaller
    assert pick_lr({1e-3: math.nan}) is None
    assert SweepConfig((3e-3, 3e-4)).lrs == (3e-4, 3e-3) and SweepConfig((1e-3,), 0.25).steps(488) == 122
    for bad in [dict(lrs=()), dict(lrs=(1e-3, 1e-3)), dict(lrs=(0.0,)), dict(lrs=(1e-3,), fraction=1.5)]:
        with pytest.raises(ValueError):
            SweepConfig(**bad)


def test_sweep_picks_the_known_best_lr_and_trains_every_seed_with_it(cfg, tmp_path):
    # Known answer: at 1e-7 nothing moves in 4 steps, at 30 AdamW's steps of ~30 per weight
    # wreck the model; 1e-2 learns. (One variant: every run also draws its loss plot, ~1 s.)
    variants, out = tiny_variants()[1:], tmp_path / "exp"
    sweep = SweepConfig((1e-7, 1e-2, 30.0), fraction=0.5)
    result = run_experiment("dense-vs-moe", out, cfg, steps=8, seeds=2, variants=variants, sweep=sweep, **quiet())
    rec = result["lr_sweep"]
    assert (rec["steps"], rec["seed"], rec["lrs"]) == (4, 0, [1e-7, 1e-2, 30.0])
    for v in variants:
        r = rec["variants"][v.name]
        assert r["chosen"] == 1e-2 and not r["at_edge"]
        assert r["losses"][1] < r["losses"][0] and not r["losses"][1] >= r["losses"][2]  # 30 may be nan
        for lr, loss in zip(rec["lrs"], r["losses"]):  # recorded = the sweep run's own final loss
            run = out / "sweep" / f"lr-{lr:g}" / "runs" / v.name
            assert json.loads((run / "train_config.json").read_text())["max_steps"] == 4
            evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
            assert evals[-1]["val_loss"] == loss or (math.isnan(loss) and math.isnan(evals[-1]["val_loss"]))
        s0 = json.loads((out / "runs" / v.name / "train_config.json").read_text())
        s1 = json.loads((out / "runs" / "seed-1" / v.name / "train_config.json").read_text())
        assert s0["lr"] == 1e-2 and s0["max_steps"] == 8 and {k for k in s0 if s0[k] != s1[k]} == {"seed"}
    assert [r["lr"] for r in result["rows"]] == [1e-2]
    assert "**1e-2: " in (out / "results.md").read_text()
    logs: list[str] = []  # again: every sweep and full run is reused
    run_experiment("dense-vs-moe", out, cfg, steps=8, seeds=2, variants=variants, sweep=sweep, **quiet(log=logs.append))
    assert sum("reusing" in line for line in logs) == 3 + 2 and not any("training" in x for x in logs)


def test_scaling_resumes_by_budget_and_reports_from_finished_runs(cfg, tmp_path, capsys):
    variants = [dataclasses.replace(v, model=small(v.model)) for v in EXPERIMENTS["scaling"].variants()
                if v.name in ("tiny-dense", "dense-total")]
    out, sweep, logs = tmp_path / "scaling", SweepConfig((1e-2,), fraction=0.5), []  # one lr: its folders
    run_scaling("scaling", out, cfg, [64], sweep=sweep, variants=variants, **quiet())
    # The first budget is done; the report of the full plan counts it and says it is provisional.
    report = run_scaling("scaling", out, cfg, [64, 128], sweep=sweep, variants=variants, report_only=True, **quiet())
    assert [len(r["seeds"]) for t in report["tables"] for r in t["rows"]] == [1, 1, 0, 0]
    assert report["sanity"]["budget"] == 64 and report["sanity"]["provisional"]
    assert report["tables"][0]["rows"][0]["sweep"]["chosen"] == 1e-2 and report["tables"][1]["rows"][0]["sweep"] == \
        dict(lrs=[1e-2], losses=[None], chosen=None, at_edge=False)  # budget 128 not swept yet
    report = run_scaling("scaling", out, cfg, [64, 128], sweep=sweep, variants=variants, **quiet(log=logs.append))
    assert sum("reusing" in line for line in logs) == 2 + 2  # budget 64: sweeps and runs
    assert (out / budget_folder(128) / "runs" / "dense-total").is_dir() and report["sanity"]["budget"] == 128
    assert not report["sanity"]["provisional"] and report["sanity"]["status"] in ("passed", "failed")
    assert {p.name for p in out.iterdir()} >= {"scaling.md", "scaling.json", "scaling.png", "budget-64", "budget-128"}
    # The CLI's --report-only reads the same folder (same tokens per step -> same steps per budget),
    # for the variants --variants names.
    assert main(["experiment", "scaling", "--report-only", "--budgets", "64,128", "--lr-sweep", "1e-2",
                 "--variants", "tiny-dense,dense-total", "--data", str(cfg.data.sources[0]), "--tokenizer", "bytes",
                 "--seq-len", "8", "--batch-size", "2", "--out", str(out)]) == 0
    assert report["sanity"]["text"] in capsys.readouterr().out
    written = json.loads((out / "scaling.json").read_text())
    assert written["sanity"] == report["sanity"]
    assert [[r["variant"] for r in t["rows"]] for t in written["tables"]] == [["tiny-dense", "dense-total"]] * 2


def _curve(losses, tokens_per_eval=100, flops_per_token=10.0, moe=False):
    points = [dict(step=i, tokens=tokens_per_eval * i, flops=flops_per_token * tokens_per_eval * i,
                   train_seconds=float(i), val_loss=loss) for i, loss in enumerate(losses)]
    return dict(points=points, total_params=10, active_params=5, train_flops_per_token=flops_per_token, moe=moe, lr=1e-3)


def _budget(tokens, finals: dict[str, list[float]]):
    """A collected budget whose variants end at the given final losses (one per seed)."""
    steps = tokens // 100
    return dict(tokens=tokens, label=tokens_label(tokens), steps=steps, variants=[
        dict(name=name, description=name, sweep={},
             seeds={s: _curve([6.0] + [loss + 0.1] * (steps - 1) + [loss], moe="moe" in name) for s, loss in enumerate(fs)})
        for name, fs in finals.items()])


def _report(budgets):
    return build_report(dict(experiment="scaling", question="?", command="c", check=["dense-total", "tiny-dense"],
                             seeds=2, planned_budgets=[b["tokens"] for b in budgets], tokens_per_step=100,
                             machine="m", sweep=None, budgets=budgets))


def test_sanity_check_passes_only_when_the_larger_model_wins_at_the_largest_budget():
    fails = _report([_budget(1000, {"tiny-dense": [5.0, 5.1], "tiny-moe": [4.9, 4.8], "dense-total": [4.8, 4.9]}),
                     _budget(4000, {"tiny-dense": [4.0, 4.1], "tiny-moe": [3.9, 3.8], "dense-total": [4.05, 4.2]})])
    assert fails["sanity"]["status"] == "failed" and fails["sanity"]["budget"] == 4000
    assert "hyperparameter-limited" in fails["sanity"]["text"] and not fails["sanity"]["provisional"]
    assert fails["conclusion"] == [fails["sanity"]["text"]]  # nothing said about the MoE
    assert "tiny-moe at" not in render_markdown(fails)
    passes = _report([_budget(1000, {"tiny-dense": [5.0, 5.1], "tiny-moe": [5.2, 5.3], "dense-total": [5.2, 5.3]}),
                      _budget(4000, {"tiny-dense": [4.0, 4.1], "tiny-moe": [3.9, 3.8], "dense-total": [3.95, 4.0]})])
    s = passes["sanity"]
    assert s["status"] == "passed" and (s["lower_in"], s["paired_seeds"]) == (2, 2)
    assert any(line.startswith("- tiny-moe at 4k tokens: -0.2000") and line.endswith("lower.")
               for line in passes["conclusion"])
    assert "Sanity check passed at 4k tokens" in render_markdown(passes)
    # Without the larger model's runs at the largest budget, the check falls back and says so.
    partial = _report([_budget(1000, {"tiny-dense": [5.0], "tiny-moe": [4.9], "dense-total": [4.8]}),
                       _budget(4000, {"tiny-dense": [4.0], "tiny-moe": [], "dense-total": []})])
    assert partial["sanity"]["budget"] == 1000 and partial["sanity"]["provisional"]
    assert _report([_budget(1000, {"tiny-dense": [], "dense-total": []})])["sanity"]["status"] == "not measured"


def test_speedups_within_a_run_and_across_budgets():
    tables = [dict(tokens=t, label=tokens_label(t), steps=t // 100, rows=budget_rows(b)) for t, b in [
        (1000, _budget(1000, {"tiny-dense": [5.0], "tiny-moe": [4.75]})),
        (4000, _budget(4000, {"tiny-dense": [4.5], "tiny-moe": [4.0]}))]]
    moe = tables[1]["rows"][1]  # its curve: 6.0 at 0 tokens, 4.1 at 100: it reaches 4.5 at 1.5/1.9 of 100
    assert moe["tokens_to_baseline"] == pytest.approx(100 * 1.5 / 1.9)
    assert moe["speedup"] == pytest.approx(4000 / (100 * 1.5 / 1.9))
    across = speedup_across_budgets(tables, "tiny-moe")
    assert (across[0]["bound"], across[0]["tokens"], across[0]["speedup"]) == ("at most", 1000, None)
    # 4.5 lies a third of the way from 4.75 (1000 tokens) to 4.0 (4000 tokens), in log tokens
    assert across[1]["bound"] is None and across[1]["tokens"] == pytest.approx(1000 * 4 ** (1 / 3))
    assert across[1]["speedup"] == pytest.approx(4000 / (1000 * 4 ** (1 / 3)))
    worse = speedup_across_budgets([dict(t, rows=[t["rows"][0], dict(t["rows"][1], final=dict(
        t["rows"][1]["final"], mean=9.0))]) for t in tables], "tiny-moe")
    assert [(w["bound"], w["tokens"]) for w in worse] == [("more than", 4000), ("more than", 4000)]


def test_token_budgets_parse_and_label():
    assert [parse_tokens(t) for t in ("0.5M", "2M", "500k", "8000000", "1.5B", "64")] == \
        [500_000, 2_000_000, 500_000, 8_000_000, 1_500_000_000, 64]
    assert [tokens_label(n) for n in (500_000, 2_000_000, 8_000_000, 64, 1_500_000_000)] == \
        ["500k", "2M", "8M", "64", "1.5B"]
    for bad in ("", "2X", "-1M", "0"):
        with pytest.raises(ValueError):
            parse_tokens(bad)


@pytest.mark.parametrize("args, message", [
    (["experiment", "scaling", "--budgets", "2X"], "token budget"),
    (["experiment", "scaling", "--lr-sweep", "1e-3,0"], "must be > 0"),
    (["experiment", "scaling", "--lr-sweep", "1e-3,1e-3"], "twice"),
    (["experiment", "scaling", "--sweep-fraction", "1.5"], "must be <= 1"),
    (["experiment", "scaling", "--steps", "10"], "--steps does not apply"),
    (["experiment", "scaling", "--set", "lr=1e-3"], "exclude each other"),
    (["experiment", "dense-vs-moe", "--report-only"], "--report-only needs budgets"),
    (["experiment", "scaling", "--report-only"], "no such results folder"),
    (["experiment", "upcycle", "--lr-sweep", "1e-3,3e-3", "--steps", "3"], "fresh variants"),
])
def test_scaling_bad_input_exits_2(tmp_path, capsys, args, message):
    assert message in usage_error(args + ["--out", str(tmp_path / "o")], capsys)
