"""Distributed training steps equal the single-process run: 2-process data parallel, expert
parallel and expert parallel + FSDP2, over the same global batches, for 20 steps."""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_ranks
from moekit.config import ModelConfig, MoEConfig
from moekit.distributed.checkpoint import full_state_dict
from moekit.distributed.mesh import ParallelConfig, init_mesh, single_process
from moekit.distributed.parallelize import parallelize
from moekit.model import MoETransformer
from moekit.training.config import TrainConfig
from moekit.training.loop import train_step
from moekit.training.optim import build_optimizer

pytestmark = pytest.mark.distributed

STEPS, BATCH, SEQ, VOCAB = 20, 4, 8, 64


def _model_cfg(**moe) -> ModelConfig:
    moe = {**dict(d_model=16, d_expert=8, num_experts=4, top_k=2, load_balance_coef=0.01), **moe}
    return ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=SEQ,
                       moe=MoEConfig(**moe))


def _run(ctx, pcfg: ParallelConfig | None, moe: dict) -> dict:
    """20 steps; every rank draws the same global batches and trains on its rows."""
    torch.manual_seed(0)
    model = MoETransformer(_model_cfg(**moe))
    if pcfg is not None:
        parallelize(model, ctx, pcfg)
    cfg = TrainConfig(batch_size=BATCH, seq_len=SEQ, lr=1e-2, warmup_steps=1, grad_clip=0.5)
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (3, BATCH, SEQ + 1), generator=gen)  # 3 batches in turn: it learns them
    losses, norms = [], []
    for step in range(STEPS):
        batch = data[step % 3]
        res = train_step(model, opt, [batch], cfg, cfg.lr, torch.device("cpu"), dist=ctx)
        losses.append(res.loss)
        norms.append(res.grad_norm)
    biases = [layer.router.expert_bias.clone() for layer in model.moe_layers() if layer.cfg.has_selection_bias]
    weights = full_state_dict(model, ctx) if ctx.distributed else model.state_dict()
    return dict(losses=losses, norms=norms, biases=biases, weights={k: v.clone() for k, v in weights.items()})


MOE = dict(bias_update_rate=0.01)  # the aux-free bias moves every step, from all-reduced loads

# Global balancing statistics: the Switch loss of the whole global batch, as one process has it.
MODES = {"dp": ParallelConfig(balance_stats="global"), "ep": ParallelConfig(ep=2, balance_stats="global"),
         "ep+fsdp": ParallelConfig(ep=2, fsdp=True, balance_stats="global"),
         "fsdp": ParallelConfig(fsdp=True, balance_stats="global")}


def _distributed_runs(rank: int, world: int) -> dict:
    out = {}
    for name, pcfg in MODES.items():
        ctx = init_mesh(pcfg, 4)
        out[name] = _run(ctx, pcfg, MOE)
    return out


def test_two_process_runs_equal_the_single_process_run():
    ref = _run(single_process(torch.device("cpu")), None, MOE)
    results = run_ranks(_distributed_runs, 2, timeout=120)
    for rank, runs in enumerate(results):
        for name, run in runs.items():
            assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5), f"{name}, rank {rank}"
            assert run["norms"] == pytest.approx(ref["norms"], rel=1e-4), f"{name}, rank {rank}"
            for b, b_ref in zip(run["biases"], ref["biases"]):
                assert torch.equal(b, b_ref), f"{name}, rank {rank}: aux-free bias differs"
            assert run["weights"].keys() == ref["weights"].keys()
            for key, w in run["weights"].items():
                w_ref = ref["weights"][key]
                assert (w - w_ref).abs().max() <= 1e-4 * w_ref.abs().max(), f"{name}, rank {rank}: {key}"
    assert ref["losses"][-1] < ref["losses"][0]  # it trains: the comparison is not of constants
