"""Distillation MoE -> dense, Switch Transformer's recipe (Fedus et al. 2021, sec. 5, Table 7).

Shape legend: B batch, S sequence, V vocabulary, T = B*S tokens, E experts.

1. The student (dense) takes every teacher weight whose name and shape it shares: embeddings,
   attention, norms, output head ("initialize the student with the non-expert weights").
2. Each dense FFN starts as the routing-frequency-weighted average of its layer's experts,
   sum_e f_e W_e with f the share of the teacher's routed slots that went to expert e,
   when the student's d_ff equals the teacher's d_expert.
3. Loss = alpha * soft cross-entropy to the teacher's temperature-scaled distribution
   + (1 - alpha) * cross-entropy to the data's next tokens; Switch's best mix is alpha = 0.25.
   The teacher runs on the fly, in eval mode, without gradients: no precomputed logits.
4. Reported like Switch's Table 7: the share of the teacher's gain over a baseline student
   (the same student trained without the teacher) that the distilled student keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from moekit.config import ModelConfig
from moekit.errors import ConfigError, UsageError
from moekit.model import LossParts, ModelOutput, MoETransformer


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over tokens of -sum_v p_teacher(v) log p_student(v), both at temperature T.

    [.., V] logits -> scalar (fp32). Hinton et al. 2015 scale by T^2 so the soft gradients
    keep their size as T changes; at T = 1 (Switch) this is the plain soft cross-entropy."""
    t = temperature
    p_teacher = torch.softmax(teacher_logits.float() / t, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / t, dim=-1)
    return -(p_teacher * log_q).sum(-1).mean() * (t * t)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float = 0.25, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha * soft + (1 - alpha) * hard, soft, hard): logits [B, S, V], targets [B, S]."""
    soft = soft_cross_entropy(student_logits, teacher_logits, temperature)
    hard = F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1))
    return alpha * soft + (1 - alpha) * hard, soft, hard


def gain_kept(baseline_loss: float, student_loss: float, teacher_loss: float) -> float:
    """Share of the teacher's gain over the baseline student that the distilled student keeps:
    (baseline - student) / (baseline - teacher), as in Switch's Table 7 (they report ~30 %)."""
    gap = baseline_loss - teacher_loss
    if gap <= 0:
        raise ValueError(f"the teacher ({teacher_loss:.4f}) is not better than the baseline ({baseline_loss:.4f})")
    return (baseline_loss - student_loss) / gap


@dataclass
class DistillLoss:
    """A ``LossFn`` for ``train``: the distillation loss plus the student's own balancing losses.
    ``lm`` reports the hard-label cross-entropy, so train and validation losses stay comparable."""

    teacher: MoETransformer
    alpha: float = 0.25
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        self.teacher.eval().requires_grad_(False)

    def __call__(self, out: ModelOutput, batch: torch.Tensor) -> LossParts:
        inputs = batch[:, :-1]
        with torch.no_grad():
            teacher_logits = self.teacher(inputs.to(next(self.teacher.parameters()).device)).logits
        if teacher_logits.shape[-1] != out.logits.shape[-1]:
            raise UsageError(f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary "
                             f"{out.logits.shape[-1]}: distillation needs the same tokenizer")
        total, _, hard = distillation_loss(out.logits, teacher_logits.to(out.logits.device), batch[:, 1:],
                                           self.alpha, self.temperature)
        return LossParts(total=total + out.aux_loss, lm=hard, aux=out.aux_loss)


def dense_student_config(teacher: ModelConfig) -> ModelConfig:
    """The teacher without its MoE: every FFN dense, d_ff = the teacher's expert width (so the
    experts' average fits), same attention, vocabulary and context."""
    if teacher.moe is None:
        raise UsageError("the teacher is dense: distillation here takes an MoE teacher")
    return replace(teacher, moe=None, d_ff=teacher.moe.d_expert, hf_architecture=None)


def check_vocabularies(teacher: ModelConfig, student: ModelConfig) -> None:
    if teacher.vocab_size != student.vocab_size:
        raise UsageError(f"teacher vocabulary {teacher.vocab_size} != student vocabulary {student.vocab_size}: "
                         "distillation needs the same tokenizer")


@torch.no_grad()
def expert_frequencies(teacher: MoETransformer, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per MoE layer, the share of routed slots [E] each expert got on ``batches`` [B, S+1]."""
    was_training = teacher.training
    teacher.eval()
    counts = [torch.zeros(layer.cfg.num_experts, dtype=torch.float64) for layer in teacher.moe_layers()]
    for batch in batches:
        teacher(batch[:, :-1])
        for c, stats in zip(counts, teacher.routing_stats()):
            c += stats.tokens_per_expert.double()
    teacher.train(was_training)
    return [(c / c.sum().clamp_min(1)).float() for c in counts]


@torch.no_grad()
def init_student(student: MoETransformer, teacher: MoETransformer, frequencies: list[torch.Tensor]) -> list[str]:
    """Steps 1 and 2 of the recipe, in place -> what was copied or averaged (for the report)."""
    check_vocabularies(teacher.cfg, student.cfg)
    mine = student.state_dict()
    copied = [k for k, v in teacher.state_dict().items() if k in mine and mine[k].shape == v.shape]
    student.load_state_dict({k: teacher.state_dict()[k] for k in copied}, strict=False)
    averaged = []
    moe_blocks = [b for b in teacher.blocks if b.is_moe]
    for block, f_E in zip(moe_blocks, frequencies):
        if block.layer_id >= len(student.blocks) or student.blocks[block.layer_id].is_moe:
            continue
        ffn, experts = student.blocks[block.layer_id].ffn, block.ffn.experts
        if ffn.w_in.weight.shape != experts.w_in.shape[1:] or experts.activation != ffn.activation:
            continue
        f = f_E.to(experts.w_in)
        ffn.w_in.weight.copy_(torch.einsum("e,ehd->hd", f, experts.w_in))  # [H, D]
        ffn.w_out.weight.copy_(torch.einsum("e,edf->df", f, experts.w_out))  # [D, F]
        averaged.append(f"blocks.{block.layer_id}.ffn")
    return copied + averaged


__all__ = ["soft_cross_entropy", "distillation_loss", "gain_kept", "DistillLoss", "dense_student_config",
           "check_vocabularies", "expert_frequencies", "init_student"]
