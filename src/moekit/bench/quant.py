"""``moekit bench quant``: MoE-layer decode at batch 1 with fp32, bf16, int8 and int4 experts.

Decode at batch 1 reads each chosen expert's weights once per token, so its speed is bound
by weight bytes: int8 halves them against bf16 and int4 quarters them (plus scales). The
candidates are one ``MoELayer`` with the same float weights, its experts cast or swapped for
``QuantizedExperts``; activations are bf16 for the quantized ones (torch's CPU kernels are
fast only there, see quant/kernels.py). Each repeat times ``calls`` single-token forwards
per candidate, interleaved (fp32, bf16, int8, int4, fp32, ...) so that drift in machine load
hits them alike; the figure is the median, and ratios are against bf16.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from moekit.config import MoEConfig
from moekit.layers.moe import MoELayer
from moekit.quant.modules import QuantizedExperts

FORMATS = ("fp32", "bf16", "int8", "int4")


@dataclass
class QuantRow:
    format: str
    expert_bytes: int  # bytes of all the layer's expert weights (scales included)
    times_us: list[float] = field(default_factory=list)  # per token, one entry per repeat

    @property
    def us(self) -> float:
        return statistics.median(self.times_us)


def build(fmt: str, cfg: MoEConfig, seed: int, group_size: int) -> tuple[MoELayer, torch.dtype]:
    torch.manual_seed(seed)
    layer = MoELayer(cfg).eval()
    act = torch.float32 if fmt == "fp32" else torch.bfloat16
    if fmt in ("int8", "int4"):
        layer.experts = QuantizedExperts.from_float(layer.experts, 8 if fmt == "int8" else 4, group_size)
    layer.to(act)
    layer.router.float()  # routing stays fp32, as in a loaded model
    return layer, act


def expert_bytes(layer: MoELayer) -> int:
    return sum(t.numel() * t.element_size() for t in layer.experts.state_dict().values())


@torch.inference_mode()
def run(d_model: int, d_expert: int, num_experts: int, top_k: int, formats: list[str], repeats: int,
        calls: int, group_size: int = 64, seed: int = 0) -> list[QuantRow]:
    cfg = MoEConfig(d_model=d_model, d_expert=d_expert, num_experts=num_experts, top_k=top_k)
    layers = {f: build(f, cfg, seed, group_size) for f in formats}
    xs = torch.randn(calls, 1, 1, d_model, generator=torch.Generator().manual_seed(seed + 1))  # fresh tokens
    rows = {f: QuantRow(f, expert_bytes(layer)) for f, (layer, _) in layers.items()}
    for rep in range(repeats + 1):  # the first round warms up
        for f, (layer, act) in layers.items():
            x = xs.to(act)
            t0 = time.perf_counter()
            for i in range(calls):
                layer(x[i])
            if rep:
                rows[f].times_us.append((time.perf_counter() - t0) / calls * 1e6)
    return list(rows.values())


def format_table(rows: list[QuantRow]) -> str:
    from moekit.accounting import human

    base = next((r.us for r in rows if r.format == "bf16"), None)
    lines = [f"{'experts':<8} {'weights':>10} {'us/token':>10} {'tokens/s':>10} {'vs bf16':>8}"]
    for r in rows:
        ratio = f"{base / r.us:.2f}x" if base else "-"
        lines.append(f"{r.format:<8} {human(r.expert_bytes, 'B'):>10} {r.us:>10.0f} {1e6 / r.us:>10.0f} {ratio:>8}")
    return "\n".join(lines)


__all__ = ["FORMATS", "QuantRow", "run", "format_table"]
