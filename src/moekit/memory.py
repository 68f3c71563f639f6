"""Will a model fit? Its bytes, counted from the config, against the memory available now.

Every command that builds a model (``demo``, ``train``, ``eval``, ``sample``,
``from_pretrained``, and generation/serving) calls ``check_fits`` first, so that a preset of
187 GB is refused in one line instead of heading for the out-of-memory killer.

The count is a floor, not a forecast: the weights (and, for training, their gradients and
AdamW's two moments, all fp32) of ``accounting.count_params``. Activations, the KV cache and
the allocator's slack come on top, which is why a model must fit with ``HEADROOM`` to spare.

Available memory: on CPU the kernel's ``MemAvailable`` (what can be allocated without
swapping), lowered to a container's cgroup limit when one is set; on other systems
``sysconf``; where neither exists the check is skipped rather than guessed. On a GPU,
``torch.cuda.mem_get_info``'s free bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from moekit.config import ModelConfig
from moekit.errors import UsageError

HEADROOM = 1.1  # 10% for activations, buffers and the allocator, on top of the counted bytes
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's exp_avg and exp_avg_sq
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "float64": 8}


class InsufficientMemoryError(UsageError):
    """The model would not fit in the memory available (one line; ``--force`` skips the check)."""


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under a container's memory limit (cgroup v2, then v1), None when unlimited."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path("/sys/fs/cgroup", limit_file).read_text().strip()
            usage = int(Path("/sys/fs/cgroup", usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge sentinel means no limit
            return max(int(limit) - usage, 0)
    return None


def cpu_available_bytes() -> int | None:
    """Bytes of RAM that can be allocated now without swapping, or None where unknown."""
    avail = _meminfo_available()
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free, not reclaimable: a floor
        except (ValueError, OSError, AttributeError):  # macOS and Windows lack these names
            return None
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def available_bytes(device: str = "cpu") -> int | None:
    """Free memory of ``device`` ("cpu", "cuda", "cuda:N"), or None where it cannot be known."""
    device = str(device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return cpu_available_bytes()


def required_bytes(cfg: ModelConfig, dtype: str = "fp32", training: bool = False) -> int:
    """The counted floor: weights in ``dtype``, or fp32 weights + gradients + AdamW moments."""
    from moekit.accounting import count_params

    n = count_params(cfg).total
    return n * (TRAIN_BYTES_PER_PARAM if training else _dtype_bytes(dtype))


def _dtype_bytes(dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.0f} MB"


def what_fits(cfg: ModelConfig, avail: int, dtype: str, training: bool) -> str:
    """A suggestion: bf16 when that alone fits (inference), else the largest preset that fits."""
    from moekit.presets import PRESETS, get_preset

    if not training and _dtype_bytes(dtype) > 2 and required_bytes(cfg, "bf16") * HEADROOM <= avail:
        return "in bf16 it would fit"
    sizes = {name: required_bytes(get_preset(name), dtype, training) for name in PRESETS}
    fitting = [name for name, need in sorted(sizes.items(), key=lambda kv: kv[1]) if need * HEADROOM <= avail]
    if fitting:
        return f"the largest preset that fits is {fitting[-1]} ({_gb(sizes[fitting[-1]])})"
    return "no preset fits; free memory or use a machine with more"


def check_fits(cfg: ModelConfig, device: str = "cpu", *, dtype: str = "fp32", training: bool = False,
               force: bool = False, what: str = "this model") -> None:
    """Raise ``InsufficientMemoryError`` (one line: both numbers and what would fit) when
    ``cfg`` would not fit on ``device``; nothing is allocated. ``force`` skips the check, and so
    does a system whose free memory cannot be read."""
    if force:
        return
    avail = available_bytes(device)
    if avail is None:
        return
    need = required_bytes(cfg, dtype, training)
    if need * HEADROOM <= avail:
        return
    kind = ("fp32 weights, gradients and AdamW moments" if training
            else f"{str(dtype).removeprefix('torch.')} weights")
    where = f"is free on {device}" if str(device).startswith("cuda") else "of RAM is available"
    raise InsufficientMemoryError(
        f"{what} needs at least {_gb(need)} ({kind}) but only {_gb(avail)} {where}; "
        f"{what_fits(cfg, avail, dtype, training)} (--force skips this check)")


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    import torch

    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


__all__ = ["check_fits", "is_out_of_memory", "available_bytes", "cpu_available_bytes", "required_bytes", "what_fits",
           "InsufficientMemoryError", "HEADROOM"]
