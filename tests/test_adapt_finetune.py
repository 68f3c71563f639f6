"""Fine-tuning: presets and --freeze patterns choose what trains, frozen weights stay
bit-identical, the coverage numbers are right, targets that match nothing are errors, routing
health is logged, and `moekit train --init` starts a new run from a run / upcycled folder."""

import dataclasses

import pytest
import torch

from moekit import MoETransformer
from moekit.adapt.finetune import finetune
from moekit.adapt.health import RouterDrift
from moekit.cli import main
from moekit.errors import UsageError
from moekit.training import read_metrics, train
from moekit.training.checkpoint import save_checkpoint
from moekit.training.freeze import PRESETS, coverage, coverage_line, module_kind, select_trainable
from moekit.training.run import load_run, write_run_files
from moekit.data.tokenizer import bytes_tokenizer
from test_training import cache, corpus, quiet, tiny_model, tiny_train  # noqa: F401 (fixtures)


def shared_model() -> MoETransformer:
    return MoETransformer(tiny_model(router="softmax", router_jitter=0.0, bias_update_rate=0.0, num_shared_experts=1))


def test_every_parameter_has_one_kind_and_presets_pick_theirs():
    model = shared_model()
    kinds = {n: module_kind(n) for n, _ in model.named_parameters()}
    assert kinds["blocks.0.ffn.experts.w_in"] == "experts" and kinds["blocks.1.ffn.router.weight"] == "router"
    assert kinds["blocks.0.ffn.shared.w_out.weight"] == "shared" and kinds["blocks.0.attn_norm.weight"] == "norm"
    assert kinds["embed.weight"] == "embedding" and kinds["lm_head.weight"] == "lm_head"
    assert any(k == "attention" for k in kinds.values())
    for preset, wanted in PRESETS.items():
        if preset == "lora":  # the adapters, once applied (test_adapt_lora_training.py)
            with pytest.raises(UsageError, match="no LoRA adapters"):
                select_trainable(model, preset)
            continue
        chosen = select_trainable(model, preset)
        assert chosen == {n for n, k in kinds.items() if k in wanted}, preset
    non_moe = select_trainable(model, "non-moe")
    assert not any(".ffn." in n for n in non_moe) and "embed.weight" in non_moe


def test_coverage_counts_the_trainable_parameters_per_kind():
    model = shared_model()
    chosen = select_trainable(model, "experts", freeze=["blocks.1.*"])
    cov = coverage(model, chosen)
    per_layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.0.ffn.experts."))
    assert cov["experts"] == (per_layer, 2 * per_layer)
    assert cov["attention"][0] == 0 and cov["attention"][1] > 0
    assert sum(t for t, _ in cov.values()) == per_layer
    assert sum(n for _, n in cov.values()) == model.num_params()
    line = coverage_line(cov)
    assert line.startswith("trainable ") and "experts " in line and "%" in line


def test_targets_that_match_nothing_or_half_an_expert_are_errors():
    dense = MoETransformer(dataclasses.replace(tiny_model(), moe=None))
    with pytest.raises(UsageError, match="--train experts matches no parameter"):
        select_trainable(dense, "experts")
    with pytest.raises(UsageError, match="--freeze 'nothing_here' matches no parameter"):
        select_trainable(shared_model(), "all", ["nothing_here"])
    with pytest.raises(UsageError, match=r"only part of blocks\.0's expert weights would train"):
        select_trainable(shared_model(), "experts", [r"blocks\.0\.ffn\.experts\.w_out"])
    with pytest.raises(UsageError, match="leaves nothing to train"):
        select_trainable(shared_model(), "router", ["router"])


def test_frozen_parameters_stay_bit_identical_and_resume_keeps_the_policy(corpus, cache, tmp_path):
    model = shared_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tiny_train(corpus, cache, max_steps=4, eval_every=2, ckpt_every=2, trainable="non-moe",
                     freeze=["blocks.0.attn.*"])
    result = train(cfg, model, tmp_path / "r", console=quiet(), stop_after=2)
    chosen = select_trainable(shared_model(), "non-moe", ["blocks.0.attn.*"])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == chosen and result.step == 2  # every trained tensor moved, nothing else (no bias here)
    from moekit.training import resume_run

    resume_run(tmp_path / "r", console=quiet())
    final = load_run(tmp_path / "r").model.state_dict()
    assert all(torch.equal(final[k], before[k]) for k in before if k not in chosen)


def test_router_drift_agrees_with_itself_and_notices_a_new_router():
    model = shared_model().eval()
    drift = RouterDrift(model)
    batches = [torch.randint(0, 257, (2, 17))]
    assert drift(model, batches) == {"top1_agreement": [1.0, 1.0]}
    with torch.no_grad():
        model.blocks[0].ffn.router.weight.normal_()
    agreement = drift(model, batches)["top1_agreement"]
    assert agreement[1] == 1.0 and agreement[0] < 0.8


def _run_folder(path, model):
    from moekit.data import DataConfig
    from moekit.training import TrainConfig

    write_run_files(path, TrainConfig(data=DataConfig(tokenizer="bytes"), seq_len=32), model.cfg, bytes_tokenizer())
    save_checkpoint(path, model, {"step": 7})
    return path


def test_finetune_from_a_run_folder_logs_routing_health(corpus, cache, tmp_path):
    start = _run_folder(tmp_path / "start", shared_model())
    cfg = tiny_train(corpus, cache, max_steps=4, eval_every=2, ckpt_every=4, trainable="experts")
    result = finetune(start, cfg, tmp_path / "ft", console=quiet())
    assert result.step == 4
    evals = read_metrics(tmp_path / "ft", "eval")
    assert [len(r["top1_agreement"]) for r in evals] == [2, 2, 2]
    assert evals[0]["top1_agreement"] == [1.0, 1.0]  # step 0: the starting router itself
    assert all("max_violation" in layer and "dead_experts" in layer for layer in evals[-1]["routing"])
    ft = load_run(tmp_path / "ft")
    assert ft.train_cfg.init == str(start) and ft.train_cfg.trainable == "experts"
    base = load_run(start).model.state_dict()
    tuned = ft.model.state_dict()
    assert all(torch.equal(base[k], tuned[k]) for k in base if ".experts." not in k)
    assert not torch.equal(base["blocks.0.ffn.experts.w_in"], tuned["blocks.0.ffn.experts.w_in"])


def test_cli_train_init_prints_coverage_and_refuses_bad_targets(corpus, cache, tmp_path, capsys):
    start = _run_folder(tmp_path / "start", shared_model())
    common = ["--data", str(corpus), "--cache-dir", str(cache), "--seq-len", "32", "--batch-size", "2",
              "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu"]
    assert main(["train", "--init", str(start), "--train", "router", "--out", str(tmp_path / "ft"), *common]) == 0
    out = capsys.readouterr().out
    assert "trainable " in out and "router " in out and "experts 0/" in out
    assert main(["train", "--init", str(start), "--freeze", "nope", "--out", str(tmp_path / "bad"), *common]) == 2
    err = capsys.readouterr().err
    assert "--freeze 'nope' matches no parameter" in err and err.count("\n") == 1
    assert main(["train", "--init", str(start), "--preset", "tiny-moe", "--out", str(tmp_path / "b2"), *common]) == 2
    assert "--preset cannot be combined with --init" in capsys.readouterr().err
