"""``moekit plan-offload``'s report: cache sizes x policies -> a table, JSON records and a plot.

A cache size is experts per MoE layer ("4") or a total expert budget ("0.5GB", "512MB"),
which becomes the experts per layer it holds: budget // (expert bytes x MoE layers).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

from moekit.errors import UsageError
from moekit.offload.planner import ONLINE, predict_speed, prefetch_accuracy, simulate
from moekit.offload.trace import Trace

_UNITS = {"gb": 1e9, "g": 1e9, "mb": 1e6, "m": 1e6, "kb": 1e3, "k": 1e3, "gib": 2**30, "mib": 2**20, "kib": 2**10}


@dataclass(frozen=True)
class CacheSize:
    """One ``--cache-sizes`` item: experts per layer, or bytes for all MoE layers together."""

    experts: int | None = None
    nbytes: float | None = None
    text: str = ""

    def per_layer(self, trace: Trace) -> int:
        if self.experts is not None:
            return self.experts
        h = trace.header
        per_layer = int(self.nbytes // (h.expert_bytes * trace.num_layers))
        if per_layer < 1:
            raise UsageError(f"cache size {self.text} holds no expert per layer: one expert is "
                             f"{h.expert_bytes / 1e6:.3g} MB and there are {trace.num_layers} MoE layers")
        return per_layer


def parse_cache_sizes(text: str) -> list[CacheSize]:
    """"2,4,8" or "0.5GB,1GB" (mixed is fine) -> CacheSizes; ValueError names a bad item."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)", item)
        unit = m[2].lower() if m else ""
        if not m or (unit and unit not in _UNITS) or (not unit and "." in m[1]):
            raise ValueError(f"must be experts per layer (2) or a size (0.5GB, 512MB), comma-separated; got {item!r}")
        value = float(m[1])
        if value <= 0:
            raise ValueError(f"must be > 0; got {item!r}")
        out.append(CacheSize(nbytes=value * _UNITS[unit], text=item) if unit else CacheSize(experts=int(value), text=item))
    return out


def plan_rows(trace: Trace, sizes: list[CacheSize], policies: list[str], prefetch: bool,
              bandwidth_gbs: float, progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """One record per (cache size, policy[+prefetch]): hit rate, bytes per token, tokens/s.
    ``progress(done, total, label)`` after each replay."""
    h = trace.header
    runs = [(p, False) for p in policies] + ([(p, True) for p in policies if p in ONLINE] if prefetch else [])
    per_layer_sizes = [size.per_layer(trace) for size in sizes]  # a size too small fails before any replay
    rows = []
    for size, per_layer in zip(sizes, per_layer_sizes):
        for policy, pf in runs:
            r = simulate(trace, per_layer, policy, pf)
            if progress is not None:
                progress(len(rows) + 1, len(sizes) * len(runs), f"{r.policy} with {per_layer} experts per layer")
            speed = predict_speed(r, h.expert_bytes, bandwidth_gbs, h.decode_tokens_per_s)
            rows.append(dict(cache=size.text, experts_per_layer=per_layer,
                             cache_gb=per_layer * h.expert_bytes * trace.num_layers / 1e9, policy=r.policy,
                             hit_rate=r.hit_rate, hits=r.hits, misses=r.misses, prefetch_loads=r.prefetch_loads,
                             prefetch_useful=r.prefetch_useful,
                             demand_mb_per_token=speed.demand_bytes_per_token / 1e6,
                             prefetch_mb_per_token=speed.prefetch_bytes_per_token / 1e6,
                             tokens_per_s=speed.tokens_per_s))
    return rows


def summary(trace: Trace, bandwidth_gbs: float, bandwidth_source: str) -> dict:
    h = trace.header
    return dict(model=h.model, family=h.family, tokens=trace.num_tokens, moe_layers=trace.num_layers,
                experts=h.num_experts, top_k=h.top_k, expert_mb=h.expert_bytes / 1e6, expert_dtype=h.expert_dtype,
                all_experts_gb=h.expert_bytes * h.num_experts * trace.num_layers / 1e9,
                bandwidth_gbs=bandwidth_gbs, bandwidth_source=bandwidth_source,
                in_memory_tokens_per_s=h.decode_tokens_per_s, prefetch_accuracy=prefetch_accuracy(trace))


def print_table(info: dict, rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log or a pipe: one row per line rather than 80 columns
            console = Console(width=120)
    acc = info["prefetch_accuracy"]
    mem = info["in_memory_tokens_per_s"]
    console.print(f"{info['model']}: {info['tokens']:,} tokens, {info['moe_layers']} MoE layers x {info['experts']} "
                  f"experts, top-{info['top_k']}; one expert {info['expert_mb']:.3g} MB ({info['expert_dtype']}), "
                  f"all experts {_size(info['all_experts_gb'])}")
    console.print(f"bandwidth {info['bandwidth_gbs']:.3g} GB/s ({info['bandwidth_source']}); in-memory decode "
                  + (f"{mem:.1f} tokens/s" if mem else "not measured (tokens/s below: transfer-bound)")
                  + ("" if acc is None else f"; prefetch guess accuracy {acc:.1%}"))
    table = Table("experts/layer", "cache", "policy", "hit rate", "MB/token demand", "MB/token prefetch", "tokens/s")
    for r in rows:
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        ahead = f"{r['prefetch_mb_per_token']:.3g}" if r["policy"].endswith("+prefetch") else "-"
        table.add_row(str(r["experts_per_layer"]), _size(r["cache_gb"]), r["policy"], f"{r['hit_rate']:.1%}",
                      f"{r['demand_mb_per_token']:.3g}", ahead, tps)
    console.print(table)


def _size(gb: float) -> str:
    return f"{gb:.3g} GB" if gb >= 1 else f"{gb * 1e3:.3g} MB" if gb >= 1e-3 else f"{gb * 1e6:.3g} KB"


def plot(rows: list[dict], info: dict, path: str) -> None:
    """Hit rate and predicted tokens/s against experts per layer, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekit.fileio import atomic_write_bytes

    fig, (ax_hit, ax_tps) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["experts_per_layer"])
        xs = [r["experts_per_layer"] for r in mine]
        ax_hit.plot(xs, [100 * r["hit_rate"] for r in mine], marker="o", label=policy)
        ax_tps.plot(xs, [r["tokens_per_s"] or 0 for r in mine], marker="o", label=policy)
    ax_hit.set(xlabel="cache size (experts per MoE layer)", ylabel="hit rate (%)", ylim=(0, 100),
               title=f"{Path(info['model']).name}: expert cache hit rate")
    ax_tps.set(xlabel="cache size (experts per MoE layer)", ylabel="predicted decode tokens/s", ylim=(0, None),
               title=f"at {info['bandwidth_gbs']:.3g} GB/s ({info['bandwidth_source']})")
    for ax in (ax_hit, ax_tps):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["CacheSize", "parse_cache_sizes", "plan_rows", "summary", "print_table", "plot"]
