"""Communication and memory of a model split over GPUs, from its config alone (``moekit
inspect MODEL --ep P --gpus W``). Nothing is allocated and torch.distributed is not imported.

All-to-all volume (expert parallelism, ``dispatcher.py``): every routed slot of a token
leaves as one row of D activations and comes back as one, so each MoE layer puts

    2 * K * D * b  bytes per token into the all-to-alls in forward (b = bytes per activation),

as much again in backward (the reverse all-to-alls of the gradients). With uniform routing a
share (P - 1) / P of it crosses to another rank; the rest stays on the sending rank. Capacity
drops would only lower it; this is the dropless figure, which is what the dispatcher counts.

Memory per GPU (weights and training state; activations and buffers not counted): routed
experts are split P ways by expert parallelism and, with FSDP, a further R = W / P ways;
everything else is replicated (DDP) or split W ways (FSDP). Training state is 16 bytes a
parameter: fp32 weights, gradients and AdamW's two moments (moekit's fp32 training), which is
also mixed precision's total (bf16 weights and gradients, fp32 master and moments; ZeRO,
Rajbhandari et al. 2020, sec. 3.1).
"""

from __future__ import annotations

import math

from moekit.accounting import GPU_BYTES, count_params, human
from moekit.config import ModelConfig
from moekit.errors import UsageError

TRAIN_BYTES_PER_PARAM = 16  # weights 4 + gradients 4 + AdamW moments 8 (fp32), see the docstring
INFER_BYTES_PER_PARAM = 2  # bf16 weights


def a2a_bytes_per_token_per_layer(cfg: ModelConfig, bytes_per_activation: int = 2) -> int:
    """Forward bytes one token puts into one MoE layer's all-to-alls: dispatch + combine."""
    return 2 * cfg.moe.top_k * cfg.d_model * bytes_per_activation


def check_split(cfg: ModelConfig, ep: int, gpus: int) -> None:
    if ep < 1 or gpus < 1:
        raise UsageError(f"--ep and --gpus must be >= 1, got --ep {ep} --gpus {gpus}")
    if ep > 1 and cfg.moe is None:
        raise UsageError(f"--ep {ep} needs an MoE model; this one has no MoE layer")
    if cfg.moe is not None and cfg.moe.num_experts % ep:
        raise UsageError(f"--ep {ep} does not divide the number of experts {cfg.moe.num_experts}")
    if gpus % ep:
        raise UsageError(f"--ep {ep} does not divide --gpus {gpus}")


def per_gpu_params(cfg: ModelConfig, ep: int, gpus: int, fsdp: bool) -> float:
    """Parameters one GPU holds: its expert slice plus the rest, replicated or sharded."""
    pc = count_params(cfg)
    experts = pc.breakdown["routed_experts"]
    rest = pc.total - experts
    return experts / (gpus if fsdp else ep) + rest / (gpus if fsdp else 1)


def gpus_needed(cfg: ModelConfig, ep: int, bytes_per_param: float, fsdp: bool) -> int | None:
    """The fewest GPUs (a multiple of ep) whose memory holds the state; None if no number
    does (DDP: the replicated part alone is too big for one GPU)."""
    pc = count_params(cfg)
    if fsdp:
        return ep * math.ceil(pc.total * bytes_per_param / GPU_BYTES / ep)
    fits = per_gpu_params(cfg, ep, ep, fsdp=False) * bytes_per_param <= GPU_BYTES
    return ep if fits else None


def parallel_summary(cfg: ModelConfig, ep: int, gpus: int, seq_len: int, batch_size: int | None = None,
                     bytes_per_activation: int = 2) -> dict:
    """What ``moekit inspect --ep --gpus`` prints, as JSON-ready data. ``batch_size``: sequences
    per step over all GPUs (default one per GPU)."""
    check_split(cfg, ep, gpus)
    batch_size = batch_size or gpus
    n_moe = len(cfg.moe_layer_ids)
    per_token = a2a_bytes_per_token_per_layer(cfg, bytes_per_activation) if cfg.moe is not None and ep > 1 else 0
    tokens_per_gpu = batch_size * seq_len / gpus
    return {
        "ep": ep,
        "gpus": gpus,
        "dp": gpus // ep,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens_per_gpu_per_step": tokens_per_gpu,
        "a2a_bytes_per_token_per_layer_fwd": per_token,
        "a2a_off_rank_fraction": (ep - 1) / ep,
        "a2a_bytes_per_gpu_per_step_fwd": per_token * n_moe * tokens_per_gpu,
        "a2a_bytes_per_gpu_per_step_train": 2 * per_token * n_moe * tokens_per_gpu,
        "params_per_gpu": {"ddp": per_gpu_params(cfg, ep, gpus, False), "fsdp": per_gpu_params(cfg, ep, gpus, True)},
        "train_bytes_per_gpu": {k: TRAIN_BYTES_PER_PARAM * per_gpu_params(cfg, ep, gpus, k == "fsdp")
                                for k in ("ddp", "fsdp")},
        "bf16_weight_bytes_per_gpu": INFER_BYTES_PER_PARAM * per_gpu_params(cfg, ep, gpus, False),
        "gpus_80gb_needed": {
            "train_fsdp": gpus_needed(cfg, ep, TRAIN_BYTES_PER_PARAM, True),
            "train_ddp": gpus_needed(cfg, ep, TRAIN_BYTES_PER_PARAM, False),
            "bf16_weights": gpus_needed(cfg, ep, INFER_BYTES_PER_PARAM, False),
        },
    }


def format_parallel(s: dict) -> str:
    need = s["gpus_80gb_needed"]
    # None: the replicated part plus this --ep's expert slice exceeds one GPU, whatever the count.
    need_s = "  ".join(f"{k} {v if v is not None else 'none at this --ep'}" for k, v in need.items())
    return "\n".join([
        f"  split              --ep {s['ep']} x dp {s['dp']} = {s['gpus']} GPUs; {s['batch_size']} x {s['seq_len']} "
        f"tokens per step ({s['tokens_per_gpu_per_step']:,.0f} per GPU)",
        f"  all-to-all         {human(s['a2a_bytes_per_token_per_layer_fwd'], 'B')} per token per MoE layer (fwd, "
        f"dispatch + combine, bf16; {100 * s['a2a_off_rank_fraction']:.0f}% off-rank if uniform)",
        f"                     {human(s['a2a_bytes_per_gpu_per_step_fwd'], 'B')} per GPU per step fwd, "
        f"{human(s['a2a_bytes_per_gpu_per_step_train'], 'B')} fwd+bwd",
        f"  params per GPU     DDP {human(s['params_per_gpu']['ddp'])}  FSDP {human(s['params_per_gpu']['fsdp'])}",
        f"  memory per GPU     bf16 weights {human(s['bf16_weight_bytes_per_gpu'], 'B')}  training state "
        f"(16 B/param) DDP {human(s['train_bytes_per_gpu']['ddp'], 'B')}  "
        f"FSDP {human(s['train_bytes_per_gpu']['fsdp'], 'B')}  (activations not counted)",
        f"  80 GB GPUs needed  {need_s}",
    ])


DOC_MODELS = {"mixtral-8x7b": "Mixtral-8x7B", "qwen3-30b-a3b": "Qwen3-30B-A3B", "deepseek-v3": "DeepSeek-V3"}
DOC_EPS, DOC_SEQ_LEN = (8, 16, 64), 4096


def parallel_table() -> str:
    """The Markdown table of docs/distributed.md: each DOC_MODELS preset at --ep 8/16/64 with
    one GPU per expert slice (W = P) and one DOC_SEQ_LEN-token sequence per GPU per step
    (``python -m moekit.distributed.arithmetic`` prints it; a test keeps the doc equal to it)."""
    lines = [
        "| model | P | all-to-all per token per MoE layer (fwd) | per GPU per step, fwd / fwd+bwd | off-rank share "
        "| params per GPU, DDP / FSDP | training state per GPU, DDP / FSDP | bf16 weights per GPU (DDP) "
        "| 80 GB GPUs needed: train FSDP / train DDP / bf16 weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, title in DOC_MODELS.items():
        from moekit.presets import get_preset

        cfg = get_preset(preset)
        name = (f"{title} ({human(count_params(cfg).total)}; {len(cfg.moe_layer_ids)} MoE layers, K {cfg.moe.top_k}, "
                f"D {cfg.d_model}, E {cfg.moe.num_experts})")
        for ep in DOC_EPS:
            lines.append(_table_row(cfg, name, ep))
            name = title
    return "\n".join(lines) + "\n"


def _table_row(cfg: ModelConfig, name: str, ep: int) -> str:
    try:
        s = parallel_summary(cfg, ep, ep, DOC_SEQ_LEN)
    except UsageError:
        return f"| {name} | {ep} | — ({cfg.moe.num_experts} experts: P must divide them) | | | | | | |"
    need = " / ".join(str(v) if v is not None else "none" for v in s["gpus_80gb_needed"].values())
    params, train = s["params_per_gpu"], s["train_bytes_per_gpu"]
    return (f"| {name} | {ep} | {human(s['a2a_bytes_per_token_per_layer_fwd'], 'B')} "
            f"| {human(s['a2a_bytes_per_gpu_per_step_fwd'], 'B')} / {human(s['a2a_bytes_per_gpu_per_step_train'], 'B')} "
            f"| {100 * s['a2a_off_rank_fraction']:.1f} % | {human(params['ddp'])} / {human(params['fsdp'])} "
            f"| {human(train['ddp'], 'B')} / {human(train['fsdp'], 'B')} | {human(s['bf16_weight_bytes_per_gpu'], 'B')} "
            f"| {need} |")


__all__ = ["a2a_bytes_per_token_per_layer", "parallel_table", "parallel_summary", "format_parallel", "gpus_needed", "per_gpu_params",
           "check_split", "TRAIN_BYTES_PER_PARAM"]


if __name__ == "__main__":
    print(parallel_table(), end="")
