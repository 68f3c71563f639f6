"""Multi-stage experiments (upcycle, finetune, distill) and seeds: every experiment runs end to
end on shrunken models; a continuation starts where its stage ended; a seed changes the
initialization and the batch order and nothing else; the table aggregates seeds honestly."""

import dataclasses
import json
import statistics

import pytest
from rich.console import Console
from test_experiments import corpus, tiny_variants  # noqa: F401 (fixture)

from moekit.cli import main
from moekit.data import DataConfig
from moekit.experiments import EXPERIMENTS, Variant, run_experiment
from moekit.experiments.results import aggregate, render_markdown, summarize
from moekit.experiments.runner import check_variants
from moekit.experiments.stages import Start
from moekit.presets import get_preset
from moekit.training import TrainConfig, read_metrics


def small(cfg):
    """The registry's model at 1/16 of the width and 2 layers: every ratio (expert widths,
    shards, the student's FFN) stays what the experiment defines."""
    moe = cfg.moe and dataclasses.replace(cfg.moe, d_model=32, d_expert=cfg.moe.d_expert // 16,
                                          d_shared=cfg.moe.d_shared and cfg.moe.d_shared // 16)
    return dataclasses.replace(cfg, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=cfg.d_ff // 16, moe=moe,
                               max_seq_len=32)


def shrunk(name: str) -> list[Variant]:
    return [dataclasses.replace(v, model=small(v.model)) for v in EXPERIMENTS[name].variants()]


@pytest.fixture
def cfg(corpus, tmp_path):  # noqa: F811
    return TrainConfig(data=DataConfig(sources=[str(corpus)], tokenizer="bytes"), seq_len=8, batch_size=2,
                       eval_batches=1, warmup_steps=1, cache_dir=str(tmp_path / "cache"))


def run(name, out, cfg, steps=3, seeds=1, variants=None):
    return run_experiment(name, out, cfg, steps=steps, seeds=seeds, variants=variants or shrunk(name),
                          console=Console(quiet=True), log=lambda s: None)


def rows_by_name(result) -> dict:
    return {r["variant"]: r for r in result["rows"]}


def saved_train_config(run_dir) -> dict:
    return json.loads((run_dir / "train_config.json").read_text())


def test_the_new_experiments_are_well_formed():
    for exp in EXPERIMENTS.values():
        check_variants(exp.variants())  # starts and teachers name earlier variants
    up = {v.name: v for v in EXPERIMENTS["upcycle"].variants()}
    dense, moe = get_preset("tiny-dense"), get_preset("tiny-moe")
    assert up["upcycled-copy"].model.moe.d_expert == dense.d_ff  # whole copies
    granular = up["upcycled-granular"].model.moe
    assert (granular.num_experts, granular.d_expert, granular.top_k) == (8, 512, 2) == (
        moe.moe.num_experts, moe.moe.d_expert, moe.moe.top_k)  # tiny-moe's shape
    for name in ("continued-dense", "upcycled-copy", "upcycled-granular"):  # same total tokens as from scratch
        assert up["dense"].steps + up[name].steps == pytest.approx(up["moe-scratch"].steps)
    students = [v for v in EXPERIMENTS["distill"].variants() if not v.stage]
    assert {v.model.d_ff for v in students} == {moe.moe.d_expert} and all(v.model.moe is None for v in students)
    with pytest.raises(ValueError, match="not an earlier variant"):
        check_variants([Variant("b", "", dense, start=Start("a")), Variant("a", "", dense)])


def test_upcycle_continues_the_dense_stage_to_equal_tokens(cfg, tmp_path):
    out = tmp_path / "up"
    result = run("upcycle", out, cfg, steps=6)
    rows = rows_by_name(result)
    assert rows["dense"]["steps"] == 2 and rows["dense"]["stage"]
    for name in ("continued-dense", "upcycled-copy", "upcycled-granular", "moe-scratch"):
        assert rows[name]["tokens"] == 6 * cfg.tokens_per_step, name
    # The continuations read the batches after the stage's, and start from its final model:
    # a copy-upcycled model computes the dense model's logits, so its first loss is the stage's last.
    for name in ("continued-dense", "upcycled-copy", "upcycled-granular"):
        assert saved_train_config(out / "runs" / name)["first_batch"] == 2
        assert rows[name]["initial_val_loss"] == pytest.approx(rows["dense"]["final_val_loss"], abs=1e-4)
    dense_end = result["variants"][0]["points"][-1]
    copy_points = next(v for v in result["variants"] if v["name"] == "upcycled-copy")["points"]
    assert copy_points[0]["tokens"] == dense_end["tokens"] and copy_points[0]["flops"] == dense_end["flops"]
    # Two whole FFN copies per token cost more FLOPs than the granular (dense-width) variant.
    assert rows["upcycled-copy"]["flops"] > rows["upcycled-granular"]["flops"] > rows["dense"]["flops"]
    assert rows["upcycled-copy"]["top1_agreement"] is not None and rows["continued-dense"]["top1_agreement"] is None
    md = (out / "results.md").read_text()
    assert "dense (stage)" in md and "training TFLOPs (all stages)" in md and (out / "loss.png").is_file()


def test_finetune_on_another_corpus_with_freeze_policies(cfg, tmp_path):
    out = tmp_path / "ft"
    rows = rows_by_name(run("finetune", out, cfg))
    from pydoc_data.topics import topics

    assert len(list((out / "corpora" / "python-reference").glob("*.txt"))) == len(topics)
    assert saved_train_config(out / "runs" / "all")["data"]["sources"] == [str(out / "corpora" / "python-reference")]
    assert rows["pretrain"]["corpus"] is None and rows["all"]["corpus"] == "python-reference"
    assert rows["all"]["initial_val_loss"] == rows["non-moe"]["initial_val_loss"]  # one start, one validation set
    total = rows["all"]["total_params"]
    assert rows["all"]["trainable_params"] == total
    assert rows["non-moe"]["trainable_params"] < rows["router-frozen"]["trainable_params"] < total
    assert rows["experts-only"]["trainable_params"] < total - rows["non-moe"]["trainable_params"]
    lora = rows["lora-shared"]["trainable_params"], rows["lora-experts"]["trainable_params"]
    assert 0 < lora[0] < lora[1] < rows["non-moe"]["trainable_params"]  # the adapters alone
    assert (out / "runs" / "lora-experts" / "adapter").is_dir()
    for frozen_router in ("non-moe", "experts-only", "router-frozen", "lora-shared", "lora-experts"):
        assert rows[frozen_router]["top1_agreement"] == 1.0, frozen_router
    assert "trainable params" in (out / "results.md").read_text()


def test_distill_reports_the_share_of_the_teachers_gain(cfg, tmp_path):
    out = tmp_path / "di"
    result = run("distill", out, cfg)
    rows = rows_by_name(result)
    assert rows["teacher"]["steps"] == 6 and rows["baseline"]["steps"] == 3
    assert saved_train_config(out / "runs" / "init-distilled")["loss"] == "distill"
    assert saved_train_config(out / "runs" / "teacher-init")["loss"] == "lm"
    # The teacher's initialization starts the student elsewhere than a fresh one.
    assert rows["teacher-init"]["initial_val_loss"] != rows["baseline"]["initial_val_loss"]
    t, b = rows["teacher"]["final_val_loss"], rows["baseline"]["final_val_loss"]
    for name in ("distilled", "teacher-init", "init-distilled"):
        kept = rows[name]["gain_kept"]
        assert kept is None if b <= t else kept == pytest.approx((b - rows[name]["final_val_loss"]) / (b - t))


def test_seeds_change_init_and_batch_order_and_nothing_else(cfg, tmp_path):
    dense, moe = tiny_variants()
    twin = dataclasses.replace(dense, name="dense-twin")
    out = tmp_path / "seeds"
    result = run("dense-vs-moe", out, cfg, seeds=2, variants=[dense, twin, moe])
    assert result["seeds"] == [0, 1]
    for name in ("dense", "moe"):
        a, b = saved_train_config(out / "runs" / name), saved_train_config(out / "runs" / "seed-1" / name)
        assert {k for k in a if a[k] != b[k]} == {"seed"}
        assert (out / "runs" / name / "config.json").read_text() == (out / "runs" / "seed-1" / name / "config.json").read_text()
    for seed in result["per_seed"]:  # twins: the same init and batches within a seed
        assert [p["val_loss"] for p in seed[0]["points"]] == [p["val_loss"] for p in seed[1]["points"]]
    s0, s1 = (seed[0]["points"] for seed in result["per_seed"])
    assert s0[0]["val_loss"] != s1[0]["val_loss"]  # another init
    losses0 = [r["loss"] for r in read_metrics(out / "runs" / "dense", "train")]
    assert losses0 != [r["loss"] for r in read_metrics(out / "runs" / "seed-1" / "dense", "train")]
    row = result["rows"][0]
    finals = [seed[0]["points"][-1]["val_loss"] for seed in result["per_seed"]]
    assert row["final_val_loss"] == pytest.approx(statistics.mean(finals))
    assert row["spread"]["final_val_loss"]["sd"] == pytest.approx(statistics.stdev(finals))
    assert " ± " in (out / "results.md").read_text()
    # One more seed later reuses the first two.
    logs: list[str] = []
    run_experiment("dense-vs-moe", out, cfg, steps=3, seeds=3, variants=[dense, twin, moe],
                   console=Console(quiet=True), log=logs.append)
    assert sum("reusing" in line for line in logs) == 6 and (out / "runs" / "seed-2" / "moe").is_dir()
    # A seed's folder depends on the seed alone: seed 3 trained on its own joins them later.
    run_experiment("dense-vs-moe", out, dataclasses.replace(cfg, seed=3), steps=3, variants=[dense, twin, moe],
                   console=Console(quiet=True), log=logs.append)
    assert (out / "runs" / "seed-3" / "moe").is_dir()
    logs.clear()
    assert len(run_experiment("dense-vs-moe", out, cfg, steps=3, seeds=4, variants=[dense, twin, moe],
                              console=Console(quiet=True), log=logs.append)["per_seed"]) == 4
    assert sum("reusing" in line for line in logs) == 12


def _curve(name, losses, stage=False, teacher=None, **extra):
    points = [dict(step=i, tokens=100 * i, flops=1e6 * i, train_seconds=float(i), val_loss=loss, max_violation=None,
                   dead_experts=None, dropped_fraction=None, top1_agreement=None) for i, loss in enumerate(losses)]
    return dict(name=name, description=name, stage=stage, teacher=teacher, total_params=10, active_params=10,
                trainable_params=10, train_flops_per_token=1e4, points=points, moe=False, **extra)


def test_results_aggregate_seeds_and_report_the_gain_kept():
    seeds = [[_curve("teacher", [9.0, 4.0], stage=True), _curve("baseline", [9.0, 6.0]),
              _curve("student", [9.0, 5.0], teacher="teacher")],
             [_curve("teacher", [9.0, 4.5], stage=True), _curve("baseline", [9.0, 6.5]),
              _curve("student", [9.0, 7.0], teacher="teacher")]]
    per_seed = [summarize(s) for s in seeds]
    assert per_seed[0][2]["gain_kept"] == pytest.approx(0.5) and per_seed[1][2]["gain_kept"] == pytest.approx(-0.25)
    assert per_seed[0][0]["gain_kept"] is None and per_seed[0][1]["gain_kept"] == 0.0
    assert per_seed[0][1]["tokens_to_baseline_ratio"] == 1.0  # the baseline is the first non-stage variant
    rows = aggregate(per_seed)
    student = rows[2]
    assert student["final_val_loss"] == pytest.approx(6.0) and student["gain_kept"] == pytest.approx(0.125)
    assert student["spread"]["final_val_loss"] == dict(sd=pytest.approx(statistics.stdev([5.0, 7.0])), min=5.0,
                                                       max=7.0, values=[5.0, 7.0])
    assert student["tokens_to_baseline_loss"] is None  # reached in one seed only: not "reached"
    result = dict(experiment="distill", question="q", command="moekit experiment distill", steps=1,
                  tokens_per_step=100, seed=0, seeds=[0, 1], device="cpu", machine="m", wall_seconds=60.0, rows=rows)
    md = render_markdown(result)
    assert "| student | 0.00M | 0.00M | 0.0000 | 6.0000 ± 1.4142 |" in md
    assert "12.5 ± 53.0 %" in md and "teacher (stage)" in md and "seeds 0, 1" in md
    # Paired by seed: the student against the same seed's baseline, -1.0 and +0.5.
    assert "| -0.2500 ± 1.0607 (1 of 2 seeds > 0) |" in md and "final - baseline's, paired by seed" in md


def test_experiment_cli_refuses_zero_seeds(tmp_path, capsys):
    assert main(["experiment", "upcycle", "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--seeds must be >= 1" in err and len(err.strip().splitlines()) == 1
