"""Real multi-process runs for the distributed tests: W processes on 127.0.0.1 with gloo.

``run_ranks(fn, world, *args)`` forks ``world`` processes (fork: they inherit the imported
torch and moekit, so a run starts in well under a second instead of re-importing torch in
each), joins a fresh gloo process group on a free port in each, calls ``fn(rank, world, *args)``
and returns every rank's return value (anything ``torch.save`` takes), rank order.

A rank that raises fails the test with its traceback; a run still going after ``timeout``
seconds (a hang: ranks disagreeing on collectives) is killed, every rank, and fails the test.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world: int, port: int, out: Path, timeout: float, args) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        torch.save(result, out / f"{rank}.pt")
    except BaseException:
        (out / f"{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


def run_ranks(fn, world: int, *args, timeout: float = 60.0) -> list:
    ctx = mp.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        procs = [ctx.Process(target=_worker, args=(fn, r, world, port, out, timeout, args), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        errors = {r: (out / f"{r}.err").read_text() for r in range(world) if (out / f"{r}.err").exists()}
        if errors:
            r = min(errors)
            pytest.fail(f"rank {r} of {world} failed:\n{errors[r]}", pytrace=False)
        if hung:
            pytest.fail(f"ranks {hung} of {world} still running after {timeout:.0f} s: a hang (collectives "
                        "called by some ranks only?)", pytrace=False)
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            pytest.fail(f"ranks {bad} of {world} exited with {[procs[r].exitcode for r in bad]}", pytrace=False)
        return [torch.load(out / f"{r}.pt", weights_only=False) for r in range(world)]
