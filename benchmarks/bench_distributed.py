"""Distributed training steps with gloo on this machine: step time, the share of it spent in
the MoE all-to-alls, and the all-to-all bytes counted by the dispatcher against the
``moekit inspect --ep`` formula (``distributed/arithmetic.py``: they must agree within 1 %).

    python benchmarks/bench_distributed.py [--models tiny,mid] [--world 2] [--steps 8]
        [--batch-size 8] [--seq-len 128] [--json docs/bench_distributed.json]

Models: ``tiny`` is the tiny-moe preset (17.6M parameters); ``mid`` is tiny-moe widened to
d_model 384 with 16 experts of 768 (64.5M parameters, 3.7x tiny), the largest that trains in a
few seconds a step on a 2-core CPU. For each model, W processes (gloo on 127.0.0.1, one torch
thread each) build two copies of it on the same seed: plain data parallelism (``dp``: DDP
over all ranks) and expert parallelism over all ranks (``ep``). Their steps are interleaved
(dp, ep, dp, ep, ...) on the same random global batches, so machine load drifts hit both
alike; step time is the median of ``--steps`` timed steps each, after 2 warm-up steps, with
the min and max reported as the spread. The all-to-all share comes from torch.profiler over
3 further steps of ``ep`` (the c10d all-to-all events, forward and backward, counts exchange
and the wait for the other rank included), on rank 0. Bytes: the dispatcher's counter over
those 3 steps, summed over the ranks, against ``parallel_summary``'s forward bytes per GPU per
step (the figure ``moekit inspect --ep W --gpus W`` prints) times W times 3, fp32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

# Model overrides on a preset (``--set`` of moekit train, as dotted model fields).
MODELS = {
    "tiny": ("tiny-moe", {}),
    "mid": ("tiny-moe", {"d_model": 384, "n_heads": 6, "moe.d_model": 384, "moe.d_expert": 768, "moe.num_experts": 16}),
}
MODES = ("dp", "ep")


def model_config(name: str):
    from moekit.config import ModelConfig
    from moekit.presets import get_preset
    from moekit.training.config import apply_override

    preset, overrides = MODELS[name]
    d = get_preset(preset).to_dict()
    for key, value in overrides.items():
        apply_override({}, d, f"model.{key}={value}")
    return ModelConfig.from_dict(d)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args, name: str, out: str) -> None:
    import torch.distributed as dist

    from moekit.accounting import count_params
    from moekit.distributed.arithmetic import parallel_summary
    from moekit.distributed.mesh import ParallelConfig, init_mesh
    from moekit.distributed.parallelize import parallelize
    from moekit.model import MoETransformer
    from moekit.training.config import TrainConfig
    from moekit.training.loop import train_step
    from moekit.training.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=900))
    cfg = model_config(name)
    tcfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    runs = {}
    for mode in MODES:
        pcfg = ParallelConfig(ep=world if mode == "ep" else 1)
        ctx = init_mesh(pcfg, cfg.moe.num_experts)
        torch.manual_seed(0)
        model = parallelize(MoETransformer(cfg), ctx, pcfg)
        runs[mode] = (model, build_optimizer(model, tcfg), ctx)
    gen = torch.Generator().manual_seed(1)

    def step(mode: str, batch: torch.Tensor) -> float:
        model, opt, ctx = runs[mode]
        dist.barrier()
        t0 = time.perf_counter()
        train_step(model, opt, [batch], tcfg, tcfg.lr, torch.device("cpu"), dist=ctx)
        return time.perf_counter() - t0

    times = {mode: [] for mode in MODES}
    for i in range(2 + args.steps):
        batch = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
        for mode in MODES:
            dt = step(mode, batch)
            if i >= 2:
                times[mode].append(dt)
    model = runs["ep"][0]
    model.comm_counter.reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step("ep", torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen))
    events = prof.key_averages()
    a2a_us = sum(e.self_cpu_time_total for e in events if "all_to_all" in e.key or "alltoall" in e.key)
    total_us = sum(e.self_cpu_time_total for e in events)
    summary = parallel_summary(cfg, world, world, args.seq_len, args.batch_size, bytes_per_activation=4)
    counter = model.comm_counter
    result = dict(model=name, rank=rank, params=count_params(cfg).total,
                  step_s={m: times[m] for m in MODES},
                  a2a_share=a2a_us / total_us if total_us else 0.0, a2a_s_per_step=a2a_us / 3e6,
                  counted_bytes=counter.total_bytes, formula_bytes=int(summary["a2a_bytes_per_gpu_per_step_fwd"] * 3),
                  off_rank_bytes=counter.off_rank_bytes)
    Path(out, f"{name}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def summarize(name: str, ranks: list[dict]) -> dict:
    """Rank 0's times and share; bytes summed over ranks (per rank, what comes back depends on
    routing; over all ranks every routed row goes out once and comes back once)."""
    r0 = ranks[0]
    out = {"model": name}
    for mode in MODES:
        t = r0["step_s"][mode]
        out[mode] = {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "repeats": len(t)}
    out["ep_over_dp"] = out["ep"]["median_s"] / out["dp"]["median_s"]
    out["a2a_share"], out["a2a_s_per_step"] = r0["a2a_share"], r0["a2a_s_per_step"]
    counted, formula = sum(r["counted_bytes"] for r in ranks), sum(r["formula_bytes"] for r in ranks)
    out.update(counted_bytes=counted, formula_bytes=formula, bytes_rel_diff=counted / formula - 1,
               off_rank_fraction=sum(r["off_rank_bytes"] for r in ranks) / counted)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,mid", help=f"comma-separated, from {', '.join(MODELS)} (default: tiny,mid)")
    p.add_argument("--world", type=int, default=2, help="processes (default: 2)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode (default: 8)")
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    load_before, started = os.getloadavg(), time.time()
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as out:
        for name in names:
            mp.spawn(_worker, args=(args.world, free_port(), args, name, out), nprocs=args.world, join=True)
            ranks = [json.loads(Path(out, f"{name}-{r}.json").read_text()) for r in range(args.world)]
            raw += ranks
            rows.append(summarize(name, ranks))
    ok = True
    for s in rows:
        agree = abs(s["bytes_rel_diff"]) <= 0.01
        ok &= agree
        print(f"{s['model']:<5} dp {1000 * s['dp']['median_s']:7.0f} ms [{1000 * s['dp']['min_s']:.0f}-"
              f"{1000 * s['dp']['max_s']:.0f}]  ep {1000 * s['ep']['median_s']:7.0f} ms [{1000 * s['ep']['min_s']:.0f}-"
              f"{1000 * s['ep']['max_s']:.0f}]  ep/dp {s['ep_over_dp']:.2f}  all-to-all {100 * s['a2a_share']:.1f} % of ep"
              f"  bytes counted {s['counted_bytes']:,} vs inspect {s['formula_bytes']:,} "
              f"({100 * s['bytes_rel_diff']:+.2f} %, {'within' if agree else 'NOT within'} 1 %), "
              f"off-rank {s['off_rank_fraction']:.1%}")
    print(f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; {time.time() - started:.0f} s")
    if args.json:
        meta = dict(world=args.world, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                    models={n: MODELS[n] for n in names}, torch=torch.__version__, backend="gloo",
                    cpu_count=os.cpu_count(), threads_per_rank=1, time=started,
                    loadavg_before=load_before, loadavg_after=os.getloadavg())
        Path(args.json).write_text(json.dumps(dict(meta=meta, summary=rows, ranks=raw), indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
