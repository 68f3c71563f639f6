"""How fast this machine reads a file from disk: the bandwidth an offloaded expert loads at.

A file written and read back at once comes from the page cache (memory speed, not disk). So
the probe writes ``nbytes`` of random data, fsyncs it, asks the kernel to drop its cached
pages (``posix_fadvise(DONTNEED)``, which frees clean pages on Linux), then times one
sequential read in expert-sized chunks. Where the kernel keeps the pages anyway the figure is
the page cache's, which is also what a memory-mapped store re-reading a hot file gets.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

CHUNK = 4 << 20  # 4 MiB reads: about one expert of a 1-2 B-parameter MoE in bf16


def measure_read_bandwidth(folder: str | Path, nbytes: int = 64 << 20) -> float:
    """GB/s (1e9 bytes) of a cold sequential read of ``nbytes`` in ``folder``'s file system.
    The probe is a scratch file, deleted on close, not a result: no atomic write needed."""
    with tempfile.NamedTemporaryFile(prefix=".moekit-diskspeed.", dir=folder) as f:
        data = os.urandom(CHUNK)
        for _ in range(max(1, nbytes // CHUNK)):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return _timed_read(f.name)


def _timed_read(path: str) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        total, t0 = 0, time.perf_counter()
        while chunk := os.read(fd, CHUNK):
            total += len(chunk)
        return total / max(time.perf_counter() - t0, 1e-9) / 1e9
    finally:
        os.close(fd)


__all__ = ["measure_read_bandwidth"]
