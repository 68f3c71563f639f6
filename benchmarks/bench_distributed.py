"""Distributed training steps with gloo on this machine: step time, the share of it spent in
the MoE all-to-alls, and the all-to-all bytes counted by the dispatcher against the
``moekit inspect --ep`` formula.

    python benchmarks/bench_distributed.py [--preset tiny-moe] [--world 2] [--steps 10]
        [--batch-size 8] [--seq-len 128] [--json docs/bench_distributed.json]

Each mode runs in its own W processes (gloo on 127.0.0.1, one torch thread each), on the
same random global batches: plain data parallelism (``dp``) and expert parallelism over all
ranks (``ep``). Step times are the median of ``--steps`` timed steps after 2 warm-up steps;
the all-to-all share comes from torch.profiler over 3 further steps (the c10d all-to-all
events, forward and backward, counts exchange included), on rank 0.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args, mode: str, out: str) -> None:
    import torch.distributed as dist

    from moekit.distributed.arithmetic import a2a_bytes_per_token_per_layer
    from moekit.distributed.mesh import ParallelConfig, init_mesh
    from moekit.distributed.parallelize import parallelize
    from moekit.model import MoETransformer
    from moekit.presets import get_preset
    from moekit.training.config import TrainConfig
    from moekit.training.loop import train_step
    from moekit.training.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    cfg = get_preset(args.preset)
    pcfg = ParallelConfig(ep=world if mode == "ep" else 1)
    ctx = init_mesh(pcfg, cfg.moe.num_experts)
    torch.manual_seed(0)
    model = parallelize(MoETransformer(cfg), ctx, pcfg)
    tcfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    opt = build_optimizer(model, tcfg)
    gen = torch.Generator().manual_seed(1)

    def step():
        batch = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
        train_step(model, opt, [batch], tcfg, tcfg.lr, torch.device("cpu"), dist=ctx)

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    counter = model.comm_counter
    counter.reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    a2a_us = sum(e.self_cpu_time_total for e in prof.key_averages() if "all_to_all" in e.key or "alltoall" in e.key)
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    tokens_per_rank = args.batch_size * args.seq_len // world
    formula = (a2a_bytes_per_token_per_layer(cfg, 4) * len(cfg.moe_layer_ids) * tokens_per_rank * 3
               if mode == "ep" else 0)  # fp32 activations, 3 forwards
    result = dict(mode=mode, rank=rank, step_s_median=statistics.median(times), step_s=times,
                  a2a_share=a2a_us / total_us if total_us else 0.0, a2a_s_per_step=a2a_us / 3e6,
                  counted_bytes=counter.total_bytes, formula_bytes=formula, off_rank_bytes=counter.off_rank_bytes)
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-moe", help="model preset (default: tiny-moe)")
    p.add_argument("--world", type=int, default=2, help="processes (default: 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode (default: 10)")
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step (default: 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as out:
        for mode in ("dp", "ep"):
            mp.spawn(_worker, args=(args.world, free_port(), args, mode, out), nprocs=args.world, join=True)
            results += [json.loads(Path(out, f"{mode}-{r}.json").read_text()) for r in range(args.world)]
    for r in results:
        if r["rank"] != 0:
            continue
        line = f"{r['mode']:<3} step {1000 * r['step_s_median']:8.1f} ms  all-to-all {100 * r['a2a_share']:5.1f} %"
        if r["mode"] == "ep":
            # Per rank, the bytes sent back are what it received, which routing decides; summed
            # over the ranks, every row goes out once and comes back once, as the formula says.
            ranks = [x for x in results if x["mode"] == "ep"]
            counted, formula = sum(x["counted_bytes"] for x in ranks), sum(x["formula_bytes"] for x in ranks)
            off = sum(x["off_rank_bytes"] for x in ranks)
            line += (f"  bytes counted {counted:,} vs formula {formula:,} ({100 * (counted / formula - 1):+.2f} %),"
                     f" off-rank {off / counted:.1%}")
        print(line)
    if args.json:
        meta = dict(preset=args.preset, world=args.world, batch_size=args.batch_size, seq_len=args.seq_len,
                    torch=torch.__version__, backend="gloo", cpu_count=os.cpu_count(), time=time.time())
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
