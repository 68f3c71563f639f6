"""Offload a built model's routed experts: ``offload_model(model, OffloadConfig(...))``.

Applied from outside, after loading (as quantization is): for every MoE block,
1. its provider's tensors go to the store (a folder of per-layer safetensors files, or CPU RAM);
2. ``block.ffn.experts`` becomes an ``OffloadedExperts`` over a ``LayerCache`` of
   ``capacity`` slots on the model's device, and the in-memory experts are released;
3. with prefetch on, forward hooks guess each next layer's experts (``prefetch.py``) and load
   them on one background thread.
Everything else (embeddings, attention, norms, routers, shared experts, dense FFNs, the KV
cache) stays where it was.

The budget (``cache_gb``, 1 GB = 1e9 bytes) is split evenly over the MoE layers, each layer's
share a whole number of expert slots (mixtral-offloading's per-layer cache): a layer's experts
compete only with each other, and a forward that visits the layers in order does not flush
layer l+1's experts to make room for layer l's. A budget without one slot per layer is an
error naming the minimum.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.config import check_choice
from moekit.errors import ConfigError, UsageError
from moekit.offload.cache import ON_MISS, CacheStats, LayerCache
from moekit.offload.experts import OffloadedExperts, view_builder
from moekit.offload.policies import POLICIES
from moekit.offload.prefetch import Prefetcher
from moekit.offload.store import DiskStore, ExpertStore, RamStore, check_matches, write_store

STORES = ("disk", "ram")


@dataclass(frozen=True)
class OffloadConfig:
    cache_gb: float | None = None  # the fast tier's budget for expert slots, all MoE layers together (1 GB = 1e9 B)
    # or a total: non-expert weights + KV cache for the full context + the expert cache, which
    # gets what is left (``budget.py``, which then sets cache_gb to that and keeps this for the record)
    max_memory_gb: float | None = None
    kv_sequences: int = 1  # sequences whose full-context KV cache max_memory_gb reserves (serve: --max-batch)
    policy: str = "lru"  # eviction: lru (mixtral-offloading) or lfu (MoE-Infinity's frequency idea)
    prefetch: bool = True  # load the next layer's guessed experts on a background thread
    on_miss: str = "load"  # load: bring the expert into the cache; compute: run it where it lives (Fiddler)
    store: str = "disk"  # where experts live: disk (safetensors, read on demand) or ram
    store_dir: str | None = None  # the disk store's folder; None: a temporary one, removed on close
    reuse_store: bool = False  # store_dir already holds this model's experts: read them, write nothing

    def __post_init__(self):
        if self.cache_gb is None and self.max_memory_gb is None:
            raise ConfigError("give the expert cache size (cache_gb, --expert-cache-gb) or the total memory "
                              "(max_memory_gb, --max-memory)")
        for name in ("cache_gb", "max_memory_gb"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not v > 0):
                raise ConfigError(f"{name} must be a positive number of GB; got {v!r}")
        if not isinstance(self.kv_sequences, int) or self.kv_sequences < 1:
            raise ConfigError(f"kv_sequences must be a positive integer; got {self.kv_sequences!r}")
        check_choice("cache policy", self.policy, tuple(POLICIES))
        check_choice("on_miss", self.on_miss, ON_MISS)
        check_choice("store", self.store, STORES)
        if self.reuse_store and (self.store != "disk" or self.store_dir is None):
            raise ConfigError("reuse_store needs store='disk' and a store_dir")

    @property
    def budget_bytes(self) -> int:
        if self.cache_gb is None:
            raise ValueError("the expert cache size is not known yet: resolve max_memory_gb first (offload.budget)")
        return int(self.cache_gb * 1e9)

    def to_dict(self) -> dict:
        return asdict(self)


class OffloadRuntime:
    """What ``offload_model`` leaves on the model (``model.offload``): the caches, the store,
    the prefetcher and its thread, and the counters."""

    def __init__(self, cfg: OffloadConfig, store: ExpertStore, caches: dict[int, LayerCache],
                 executor: ThreadPoolExecutor | None, prefetcher: Prefetcher | None, tmp: tempfile.TemporaryDirectory | None):
        self.cfg, self.store, self.caches = cfg, store, caches
        self.executor, self.prefetcher, self._tmp = executor, prefetcher, tmp

    @property
    def stats(self) -> CacheStats:
        """Counters summed over layers (a fresh object)."""
        total = CacheStats()
        for c in self.caches.values():
            with c.lock:
                total.add(c.stats)
        return total

    def reset_stats(self) -> None:
        for c in self.caches.values():
            with c.lock:
                c.stats = CacheStats()

    def summary(self, tokens: int | None = None) -> dict:
        """Config, sizes and counters as plain data (``generate --json``, serve's stats)."""
        one = next(iter(self.caches.values()))
        return {**self.cfg.to_dict(), "layers": len(self.caches), "slots_per_layer": one.capacity,
                "expert_bytes": one.layout.expert_bytes,
                "cache_allocated_bytes": sum(c.allocated_bytes for c in self.caches.values()),
                **self.stats.to_dict(tokens)}

    def drain(self) -> None:
        for c in self.caches.values():
            c.drain()

    def close(self) -> None:
        """Stop the prefetcher, finish its loads, close the store (and remove a temporary one)."""
        if self.prefetcher is not None:
            self.prefetcher.remove()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        self.store.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    return {i: b for i, b in enumerate(model.blocks) if b.is_moe}


def slots_per_layer(cfg: OffloadConfig, slot_bytes: int, num_layers: int, num_experts: int) -> int:
    """How many experts each layer's cache holds; UsageError when the budget has no room for one."""
    slots = cfg.budget_bytes // (slot_bytes * num_layers)
    if slots < 1:
        need = slot_bytes * num_layers / 1e9
        if cfg.max_memory_gb is not None:
            raise UsageError(f"--max-memory {cfg.max_memory_gb:g} leaves {cfg.cache_gb:.3g} GB for experts, which holds "
                             f"no expert per MoE layer: one expert takes {slot_bytes / 1e6:.3g} MB and there are "
                             f"{num_layers} MoE layers; give at least {cfg.max_memory_gb - cfg.cache_gb + need:.3g}")
        raise UsageError(f"--expert-cache-gb {cfg.cache_gb:g} holds no expert per MoE layer: one expert takes "
                         f"{slot_bytes / 1e6:.3g} MB and there are {num_layers} MoE layers; give at least {need:.3g}")
    return min(slots, num_experts)


@torch.no_grad()
def offload_model(model: nn.Module, cfg: OffloadConfig) -> OffloadRuntime:
    """Move every MoE layer's routed experts to a store behind a per-layer cache (module
    docstring); returns the runtime, also set as ``model.offload``."""
    blocks = moe_blocks(model)
    if not blocks:
        raise UsageError("this model has no MoE layers: there are no experts to offload")
    if getattr(model, "offload", None) is not None:
        raise ValueError("this model's experts are already offloaded")
    templates = {i: b.ffn.experts for i, b in blocks.items()}
    check_templates(templates)
    if cfg.cache_gb is None:  # --max-memory: the cache gets what the resident part leaves
        from moekit.offload.budget import resolve_budget, resident_bytes

        cfg = resolve_budget(cfg, model.cfg, resident_bytes(model), next(model.parameters()).dtype)
    states = {i: dict(t.state_dict()) for i, t in templates.items()}
    store, tmp = _make_store(cfg, states)
    del states
    return attach(model, cfg, store, tmp, templates)


def check_templates(templates: dict[int, nn.Module]) -> None:
    """Refuse expert kinds that cannot be offloaded before anything is written."""
    for t in templates.values():
        view_builder(t, None)


def attach(model: nn.Module, cfg: OffloadConfig, store: ExpertStore, tmp: tempfile.TemporaryDirectory | None,
           templates: dict[int, nn.Module]) -> OffloadRuntime:
    """Put an ``OffloadedExperts`` over a new ``LayerCache`` in each MoE block of ``templates``
    (layer -> a provider of the experts' kind; only its metadata is read, so it may be on the
    meta device), caches on the model's device; returns the runtime, also ``model.offload``."""
    blocks = moe_blocks(model)
    device = next(model.parameters()).device
    slot_bytes = max(l.slot_bytes for l in store.layouts.values())
    capacity = slots_per_layer(cfg, slot_bytes, len(blocks), max(store.num_experts.values()))
    executor = ThreadPoolExecutor(1, thread_name_prefix="moekit-prefetch") if cfg.prefetch else None
    caches = {}
    for i, block in blocks.items():
        provider = OffloadedExperts(templates[i], None)
        provider.cache = caches[i] = LayerCache(i, store, min(capacity, store.num_experts[i]), cfg.policy, device,
                                                view_builder(templates[i], provider.scratch), cfg.on_miss, executor)
        block.ffn.experts = provider  # the in-memory experts go with the last reference to them
    templates.clear()
    prefetcher = Prefetcher(model.blocks, caches) if cfg.prefetch else None
    model.offload = OffloadRuntime(cfg, store, caches, executor, prefetcher, tmp)
    return model.offload


def _make_store(cfg: OffloadConfig, states: dict) -> tuple[ExpertStore, tempfile.TemporaryDirectory | None]:
    if cfg.reuse_store:  # the model's own expert tensors are never read (they may be uninitialized)
        store = DiskStore(cfg.store_dir)
        check_matches(store, states)
        return store, None
    if cfg.store == "ram":
        return RamStore(states), None
    tmp = None
    if cfg.store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="moekit-experts-")
        folder = Path(tmp.name)
    else:
        folder = Path(cfg.store_dir)
    write_store(states, folder)
    return DiskStore(folder), tmp


__all__ = ["OffloadConfig", "OffloadRuntime", "offload_model", "attach", "check_templates", "slots_per_layer",
           "moe_blocks", "STORES"]
