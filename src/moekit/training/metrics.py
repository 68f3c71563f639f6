"""Metrics of a run: the JSONL log (every number, one record per line), optional TensorBoard
events, and routing statistics aggregated over evaluation batches.

``metrics.jsonl`` records (every one has ``kind``, ``step`` and ``time``, the wall-clock
seconds since the epoch):

    kind="train"   loss, lm_loss, aux_loss, lr, grad_norm, tokens (seen so far), tokens_per_s,
                   elapsed (training seconds), max_violation (per MoE layer, this step's batch)
    kind="eval"    val_loss, val_ppl, routing: one entry per MoE layer (layer, tokens_per_expert,
                   max_violation, dropped_fraction, router_entropy, dead_experts, losses)
    kind="resume"  checkpoint (the folder resumed from), changed ({field: [old, new]} of the
                   optimizer settings changed with --change-optimizer)
    kind="end"     status (done | budget | interrupted | nonfinite | oom), final numbers

Non-finite numbers are written as null, so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from moekit.fileio import atomic_write_text
from moekit.routing_metrics import max_violation

METRICS_FILE = "metrics.jsonl"


@dataclass
class LayerRouting:
    """One MoE layer's routing over many batches (tokens counted before capacity drops)."""

    layer: int  # block index in the model
    tokens_per_expert: list[int]
    max_violation: float  # max load / mean load - 1 over the summed counts
    dropped_fraction: float
    router_entropy: float  # nats, token-weighted mean
    dead_experts: int  # experts that got no token in any batch
    losses: dict[str, float] = field(default_factory=dict)  # unweighted balancing losses, mean over batches

    def to_dict(self) -> dict:
        return asdict(self)


def aggregate_routing(batches: Sequence[Sequence[Any]], layer_ids: Sequence[int]) -> list[LayerRouting]:
    """``batches[b][i]`` is the RoutingStats of MoE layer i on batch b -> one LayerRouting per layer."""
    out = []
    for i, layer in enumerate(layer_ids):
        stats = [b[i] for b in batches if b[i] is not None]
        if not stats:
            continue
        counts = [sum(int(s.tokens_per_expert[e]) for s in stats) for e in range(len(stats[0].tokens_per_expert))]
        n_tok = sum(s.num_tokens for s in stats) or 1
        loss_names = sorted({k for s in stats for k in s.losses})
        out.append(LayerRouting(
            layer=layer,
            tokens_per_expert=counts,
            max_violation=max_violation(counts),
            dropped_fraction=sum(s.dropped_fraction * s.num_tokens for s in stats) / n_tok,
            router_entropy=sum(s.router_entropy * s.num_tokens for s in stats) / n_tok,
            dead_experts=sum(c == 0 for c in counts),
            losses={k: sum(s.losses.get(k, 0.0) for s in stats) / len(stats) for k in loss_names},
        ))
    return out


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a run's metrics.jsonl (those of one ``kind`` if given); [] when absent."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


class MetricsLog:
    """Appends records to RUN/metrics.jsonl (flushed per line) and, when the tensorboard
    package is installed, mirrors the scalars into TensorBoard event files in RUN/."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = _tensorboard_writer(run_dir)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint: those steps are about to run again."""
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step and json.loads(line).get("kind") != "end"]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        record = _finite_or_none({**record, "time": time.time()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tensorboard(record)

    def _tensorboard(self, record: dict) -> None:
        step, kind = record.get("step", 0), record.get("kind")
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        for r in record.get("routing", []):
            self._tb.add_scalar(f"routing/max_violation_layer{r['layer']}", r["max_violation"], step)
            self._tb.add_scalar(f"routing/entropy_layer{r['layer']}", r["router_entropy"], step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the JSONL log has every number anyway
        return None
    return SummaryWriter(log_dir=str(run_dir))


__all__ = ["LayerRouting", "aggregate_routing", "MetricsLog", "read_metrics", "METRICS_FILE"]
