"""`moekit train --init MODEL --train lora`: only the adapters train (base weights stay
bit-identical), the run writes its adapter folder, reloads, resumes, merges (`moekit lora
merge`: the merged run's logits equal the adapted run's), and bad targets exit 2 in one line."""

import pytest
import torch

from moekit import MoETransformer
from moekit.adapt.finetune import finetune
from moekit.adapt.lora import is_lora_parameter
from moekit.adapt.lora_io import ADAPTER_DIR, load_adapter, read_adapter_config
from moekit.cli import main
from moekit.training import read_metrics, resume_run
from moekit.training.run import load_run
from test_adapt_finetune import _run_folder, shared_model
from test_training import cache, corpus, quiet, tiny_train  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def lora_run(corpus, cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    start = _run_folder(root / "start", shared_model())
    cfg = tiny_train(corpus, cache, max_steps=4, eval_every=2, ckpt_every=2, trainable="lora", lora_rank=4,
                     lora_targets=["attention", "shared", "experts"], lora_dropout=0.1, expert_dropout=0.4)
    result = finetune(start, cfg, root / "ft", console=quiet())
    return start, root / "ft", result


def test_lora_run_trains_only_adapters_and_saves_them(lora_run):
    start, ft, result = lora_run
    assert result.step == 4
    base = load_run(start).model.state_dict()
    tuned = load_run(ft, merge_lora=False).model.state_dict()
    assert all(torch.equal(base[k], tuned[k]) for k in base)  # every base tensor bit-identical
    adapters = {k for k in tuned if is_lora_parameter(k)}
    assert any(".ffn.experts.w_in_lora_B" in k for k in adapters) and any(".attn.wq.lora_A" in k for k in adapters)
    assert any(".ffn.shared.w_out.lora_B" in k for k in adapters)
    assert all(tuned[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))  # B moved off zero
    cfg, meta = read_adapter_config(ft / ADAPTER_DIR)
    assert cfg.rank == 4 and meta["step"] == 4 and meta["init"] == str(start)
    assert "blocks.0.ffn.experts.w_in" in meta["matrices"] and "blocks.0.attn.wq.weight" in meta["matrices"]
    # the adapter folder alone, on the start model, gives the run's model
    model = load_run(start).model
    load_adapter(model, ft / ADAPTER_DIR)
    ids = torch.randint(0, 257, (2, 16))
    torch.testing.assert_close(model.eval()(ids).logits, load_run(ft, merge_lora=False).model(ids).logits)


def test_load_run_of_a_lora_run_is_the_merged_plain_model_and_fine_tunes_further(lora_run, corpus, cache, tmp_path):
    from moekit.adapt.lora import LoRAExperts

    _, ft, _ = lora_run
    merged = load_run(ft).model
    assert not any(isinstance(m, LoRAExperts) for m in merged.modules())
    assert not any(is_lora_parameter(n) for n, _ in merged.named_parameters())
    ids = torch.randint(0, 257, (2, 16))
    adapted = load_run(ft, merge_lora=False).model
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
    cfg = tiny_train(corpus, cache, max_steps=1, eval_every=1, ckpt_every=1, trainable="experts")
    assert finetune(ft, cfg, tmp_path / "again", console=quiet()).step == 1


def test_lora_run_resumes_with_its_adapters(lora_run, tmp_path):
    import shutil

    _, ft, _ = lora_run
    copy = tmp_path / "copy"
    shutil.copytree(ft, copy)
    result = resume_run(copy, {"max_steps": 6}, console=quiet())
    assert result.step == 6 and read_metrics(copy, "end")[-1]["step"] == 6
    assert read_adapter_config(copy / ADAPTER_DIR)[1]["step"] == 6


def test_cli_lora_merge_gives_the_adapted_logits(lora_run, tmp_path, capsys):
    _, ft, _ = lora_run
    assert main(["lora", "merge", str(ft), "--out", str(tmp_path / "merged")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    merged = load_run(tmp_path / "merged")
    assert merged.train_cfg.trainable == "all"
    assert not any(is_lora_parameter(n) for n, _ in merged.model.named_parameters())
    ids = torch.randint(0, 257, (2, 16))
    torch.testing.assert_close(merged.model(ids).logits, load_run(ft, merge_lora=False).model(ids).logits,
                               atol=1e-4, rtol=1e-4)
    assert main(["lora", "merge", str(tmp_path / "merged"), "--out", str(tmp_path / "again")]) == 2
    assert "was not trained with --train lora" in capsys.readouterr().err


def test_cli_train_lora_prints_coverage_and_refuses_bad_targets(corpus, cache, tmp_path, capsys):
    start = _run_folder(tmp_path / "start", shared_model())
    common = ["train", "--init", str(start), "--data", str(corpus), "--cache-dir", str(cache), "--seq-len", "32",
              "--batch-size", "2", "--max-steps", "1", "--eval-every", "1", "--eval-batches", "1", "--threads", "1"]
    assert main([*common, "--train", "lora", "--lora-targets", "experts", "--lora-rank", "2",
                 "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "trainable " in out and "LoRA rank 2 on experts 4 matrices" in out
    for extra, message in ((["--lora-targets", "dense"], "has no dense matrices"),
                           (["--lora-targets", "nope_nothing"], "matches no adaptable matrix"),
                           (["--lora-targets", r"experts\.w_out"], "only part of blocks.0.ffn.experts's expert weights")):
        assert main([*common, "--train", "lora", *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main([*common, "--lora-rank", "4", "--out", str(tmp_path / "bad2")]) == 2
    assert "need --train lora" in capsys.readouterr().err


def test_eval_of_a_lora_run(lora_run, capsys):
    _, ft, _ = lora_run
    assert main(["eval", str(ft), "--batches", "1", "--threads", "1"]) == 0
    assert "validation loss" in capsys.readouterr().out


def test_cli_lora_export_bad_input_is_one_line(lora_run, tmp_path, capsys):
    _, ft, _ = lora_run
    assert main(["lora", "export", str(ft), "--out", str(tmp_path / "p")]) == 2  # a native model: no HF architecture
    assert "give --architecture" in capsys.readouterr().err
    # Mixtral has no shared expert: the model does not fit it
    assert main(["lora", "export", str(ft), "--out", str(tmp_path / "p"), "--architecture", "MixtralForCausalLM"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot export" in err


def test_expert_dropout_runs_are_reproducible_and_differ_from_none(corpus, cache, tmp_path):
    from test_training import tiny_model, train_losses

    from moekit.training import train

    def run(name, p, seed=0):
        cfg = tiny_train(corpus, cache, max_steps=3, eval_every=3, ckpt_every=3, expert_dropout=p, seed=seed)
        train(cfg, tiny_model(router="softmax", router_jitter=0.0), tmp_path / name, console=quiet())  # seeded init
        return train_losses(tmp_path / name), read_metrics(tmp_path / name, "eval")[-1]["val_loss"]

    a, b, none = run("a", 0.4), run("b", 0.4), run("none", 0.0)
    assert a == b  # same seed, same dropout masks
    assert a[0][0] != none[0][0]  # dropout changed the first training loss
    assert a[0][0] > none[0][0] - 1.0  # and not absurdly
