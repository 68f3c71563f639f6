"""Distillation: the losses against a plain reference, the Switch initialization of the dense
student, the teacher frozen and gradient-free while the student trains, and the report."""

import dataclasses

import pytest
import torch

from moekit import MoETransformer
from moekit.adapt.distill import (DistillLoss, dense_student_config, distillation_loss, expert_frequencies,
                                  gain_kept, init_student, soft_cross_entropy)
from moekit.adapt.upcycle import UpcycleConfig, upcycle
from moekit.errors import UsageError
from moekit.training import read_metrics, train
from test_training import cache, corpus, quiet, tiny_model, tiny_train  # noqa: F401 (fixtures)


def reference_soft_ce(student, teacher, t):
    """The definition, token by token."""
    s, q = student.reshape(-1, student.shape[-1]).double(), teacher.reshape(-1, teacher.shape[-1]).double()
    total = 0.0
    for i in range(s.shape[0]):
        p_t = torch.exp(q[i] / t) / torch.exp(q[i] / t).sum()
        log_p_s = s[i] / t - torch.log(torch.exp(s[i] / t).sum())
        total = total - (p_t * log_p_s).sum()
    return total / s.shape[0] * t * t


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_cross_entropy_matches_the_definition_with_gradients(t, dtype):
    student = (torch.randn(2, 5, 11) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(2, 5, 11) * 3).to(dtype)
    got = soft_cross_entropy(student, teacher, t)
    ref_in = student.detach().double().requires_grad_()
    want = reference_soft_ce(ref_in, teacher, t)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert got.item() == pytest.approx(want.item(), rel=tol)
    got.backward(), want.backward()
    torch.testing.assert_close(student.grad.double(), ref_in.grad, rtol=tol * 10, atol=tol)


def test_the_mix_weights_soft_and_hard_and_soft_is_entropy_plus_kl():
    s, q = torch.randn(3, 4, 7), torch.randn(3, 4, 7)
    targets = torch.randint(0, 7, (3, 4))
    total, soft, hard = distillation_loss(s, q, targets, alpha=0.25)
    assert total.item() == pytest.approx(0.25 * soft.item() + 0.75 * hard.item(), rel=1e-6)
    assert distillation_loss(s, q, targets, alpha=0.0)[0].item() == pytest.approx(
        torch.nn.functional.cross_entropy(s.reshape(-1, 7), targets.reshape(-1)).item(), rel=1e-6)
    p = torch.softmax(q, -1)
    entropy = -(p * torch.log(p)).sum(-1).mean()
    assert soft_cross_entropy(q, q).item() == pytest.approx(entropy.item(), rel=1e-5)  # KL = 0 at the teacher
    assert soft.item() > entropy.item()


def test_gain_kept_is_switchs_table_7_share():
    assert gain_kept(baseline_loss=3.0, student_loss=2.7, teacher_loss=2.0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="not better than the baseline"):
        gain_kept(2.0, 1.9, 2.5)


def test_a_student_of_an_upcycled_teacher_is_the_original_dense_model():
    """Copies of one FFN average back to it, whatever the routing frequencies: the Switch init
    of the student then reproduces the dense model the teacher was upcycled from, exactly."""
    dense = MoETransformer(dataclasses.replace(tiny_model(), moe=None, d_ff=32)).eval()
    teacher = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2)).eval()
    freqs = expert_frequencies(teacher, [torch.randint(0, 257, (2, 17))])
    assert all(abs(f.sum().item() - 1) < 1e-6 and (f > 0).sum() > 1 for f in freqs)
    student = MoETransformer(dense_student_config(teacher.cfg))
    init_student(student, teacher, freqs)
    x = torch.randint(0, 257, (2, 16))
    torch.testing.assert_close(student(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)


def test_the_dense_ffn_is_the_frequency_weighted_average_of_the_experts():
    teacher = MoETransformer(tiny_model(router="softmax", router_jitter=0.0))
    student = MoETransformer(dense_student_config(teacher.cfg))
    freqs = [torch.tensor([0.5, 0.25, 0.25, 0.0]), torch.tensor([0.0, 0.0, 0.0, 1.0])]
    done = init_student(student, teacher, freqs)
    assert {"blocks.0.ffn", "blocks.1.ffn", "embed.weight", "blocks.1.attn.wq.weight", "norm.weight"} <= set(done)
    e0 = teacher.blocks[0].ffn.experts
    want = 0.5 * e0.w_in[0] + 0.25 * e0.w_in[1] + 0.25 * e0.w_in[2]
    torch.testing.assert_close(student.blocks[0].ffn.w_in.weight, want)
    assert torch.equal(student.blocks[1].ffn.w_out.weight, teacher.blocks[1].ffn.experts.w_out[3])
    assert torch.equal(student.embed.weight, teacher.embed.weight)


def test_mismatched_vocabularies_are_refused():
    teacher = MoETransformer(tiny_model())
    other = MoETransformer(dataclasses.replace(dense_student_config(teacher.cfg), vocab_size=300))
    with pytest.raises(UsageError, match="teacher vocabulary 257 != student vocabulary 300"):
        init_student(other, teacher, [torch.ones(4) / 4] * 2)


def test_distillation_trains_the_student_and_leaves_the_teacher_alone(corpus, cache, tmp_path):
    teacher = MoETransformer(tiny_model(router="softmax", router_jitter=0.0))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = MoETransformer(dense_student_config(teacher.cfg))
    loss = DistillLoss(teacher, alpha=0.25, temperature=2.0)
    cfg = tiny_train(corpus, cache, max_steps=4, eval_every=4, ckpt_every=4)
    result = train(cfg, student, tmp_path / "s", console=quiet(), loss_fn=loss)
    assert result.step == 4 and result.final_val_loss < result.initial_val_loss
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    train_records = read_metrics(tmp_path / "s", "train")
    assert all(r["lm_loss"] != r["loss"] for r in train_records)  # lm = the hard part, total = the mix


def _run_folder(path, model):
    from moekit.data import DataConfig
    from moekit.data.tokenizer import bytes_tokenizer
    from moekit.training import TrainConfig
    from moekit.training.checkpoint import save_checkpoint
    from moekit.training.run import write_run_files

    write_run_files(path, TrainConfig(data=DataConfig(tokenizer="bytes"), seq_len=32), model.cfg, bytes_tokenizer())
    save_checkpoint(path, model, {"step": 3})
    return path


def test_cli_distills_and_reports_against_a_baseline(corpus, cache, tmp_path, capsys):
    from moekit.cli import main

    teacher = MoETransformer(tiny_model(router="softmax", router_jitter=0.0))
    t_dir = _run_folder(tmp_path / "teacher", teacher)
    base = _run_folder(tmp_path / "base", MoETransformer(dense_student_config(teacher.cfg)))
    common = ["--data", str(corpus), "--cache-dir", str(cache), "--seq-len", "32", "--batch-size", "2",
              "--max-steps", "2", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu"]
    assert main(["distill", str(t_dir), "--out", str(tmp_path / "s"), "--baseline", str(base), *common]) == 0
    out = capsys.readouterr().out
    assert "2 dense FFNs from the routing-weighted average of the experts" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("validation loss: student ") and "teacher " in last and "baseline " in last
    assert main(["distill", str(base), "--out", str(tmp_path / "d"), *common]) == 2
    err = capsys.readouterr().err
    assert "the teacher is dense" in err and err.count("\n") == 1
    # a plain --resume would go on with the LM loss: refused, in one line
    assert main(["train", "--resume", str(tmp_path / "s"), "--max-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "trained with the distill loss" in err and err.count("\n") == 1
