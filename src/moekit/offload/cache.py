"""One MoE layer's expert cache in the fast tier: a fixed number of slots, an eviction policy
(``policies.py``), loads from a store (``store.py``) on demand or ahead of time (prefetch).

The budget is real because the memory is: ``capacity`` slots of ``layout.slot_bytes`` each,
allocated on first use and reused for every later load, so the cache never holds more than
its slots whatever the traffic (and reusing a slot costs no page faults, where a fresh
buffer per load would). A slot is either free, resident (a ready expert), or loading (a
prefetch in flight on the background thread). Loading slots and the expert a forward is
computing with (pinned) are never evicted, so a prefetch can neither be leaked nor clobber
weights in use; a demand miss that finds every slot busy waits for a load to finish.

Entry points:
- ``use(e)``: a context manager yielding expert e as a one-expert provider (``ExpertWeights``)
  and the device its weights are on; pinned while the block runs.
- ``prefetch(ids)``: start loading those of ``ids`` that are not resident, as long as slots
  can be had without waiting; never blocks.

On a miss with ``on_miss="compute"`` (Fiddler, Kamahori et al. 2024) an expert that finds no
free slot is not brought in: it is computed where the store keeps it (a CPU view of a RAM
store; on a disk store, a one-off read) and nothing is evicted. Prefetch still fills slots.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from moekit.layers.weights import ExpertWeights
from moekit.offload.policies import make_policy
from moekit.offload.store import ExpertStore

ON_MISS = ("load", "compute")


@dataclass
class CacheStats:
    """Counters of one layer's cache (``OffloadRuntime.stats`` sums them over layers)."""

    hits: int = 0  # a forward asked for a resident (or loading) expert
    misses: int = 0  # a forward asked for one that was not there
    evictions: int = 0  # resident experts dropped to make room
    prefetch_issued: int = 0  # loads started ahead of time
    prefetch_useful: int = 0  # prefetched experts that a forward then asked for
    computed_on_miss: int = 0  # misses computed from the store without caching (on_miss=compute)
    loads: int = 0  # experts copied into slots (demand and prefetch)
    bytes_moved: int = 0  # bytes read from the store (into slots, or one-off for on_miss=compute)

    def add(self, other: "CacheStats") -> "CacheStats":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def since(self, earlier: "CacheStats") -> "CacheStats":
        """The counts after ``earlier`` (a snapshot of the same counters), e.g. a decode's alone."""
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})

    def to_dict(self, tokens: int | None = None) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        asked = self.hits + self.misses
        d["hit_rate"] = self.hits / asked if asked else 0.0
        d["prefetch_accuracy"] = self.prefetch_useful / self.prefetch_issued if self.prefetch_issued else 0.0
        if tokens:
            d["bytes_per_token"] = self.bytes_moved / tokens
        return d


class _Entry:
    """A slot's occupant: ready once its load finished (``view`` set) or failed (``error``)."""

    def __init__(self, slot: int, prefetched: bool):
        self.slot, self.prefetched = slot, prefetched
        self.done = threading.Event()
        self.view: ExpertWeights | None = None
        self.error: BaseException | None = None


class LayerCache:
    def __init__(self, layer: int, store: ExpertStore, capacity: int, policy: str, device: torch.device,
                 build_view: Callable[[dict[str, torch.Tensor]], ExpertWeights], on_miss: str = "load",
                 executor: Executor | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be at least one expert; got {capacity}")
        if on_miss not in ON_MISS:
            raise ValueError(f"on_miss must be one of {', '.join(ON_MISS)}; got {on_miss!r}")
        self.layer, self.store, self.capacity, self.device = layer, store, capacity, torch.device(device)
        self.layout = store.layouts[layer]
        self.build_view, self.on_miss, self.executor = build_view, on_miss, executor
        self.policy = make_policy(policy)
        self.stats = CacheStats()
        self.lock = threading.Lock()
        self.entries: dict[int, _Entry] = {}
        self.pinned: dict[int, int] = {}  # expert -> forwards using it now
        self._slots: list[torch.Tensor | None] = [None] * capacity  # allocated on first use
        self._free = list(range(capacity - 1, -1, -1))
        self._staging = threading.local()  # a pinned CPU buffer per thread (GPU caches over a disk store)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # -- the forward's side ----------------------------------------------------------------

    @contextmanager
    def use(self, e: int) -> Iterator[tuple[ExpertWeights, torch.device]]:
        """Expert e's weights for the duration of the block (pinned: never evicted meanwhile)."""
        entry, load = self._demand(e)
        try:
            if entry is None:  # on_miss=compute without a free slot: the store's copy, not cached
                yield self._transient(e), torch.device("cpu")
                return
            if load:
                self._load(e, entry)
            entry.done.wait()
            if entry.error is not None:
                raise entry.error
            yield entry.view, self.device
        finally:
            with self.lock:
                self.pinned[e] -= 1
                if not self.pinned[e]:
                    del self.pinned[e]

    def _demand(self, e: int) -> tuple[_Entry | None, bool]:
        """(entry to wait on or None for a transient, whether this thread must load it)."""
        first = True
        while True:
            with self.lock:
                if first:  # one access per demand, however long it waits for a slot
                    self.policy.access(e)
                    first = False
                self.pinned[e] = self.pinned.get(e, 0) + 1
                entry = self.entries.get(e)
                if entry is not None:
                    self.stats.hits += 1
                    if entry.prefetched:
                        self.stats.prefetch_useful += 1
                        entry.prefetched = False
                    return entry, False
                if self.on_miss == "compute" and not self._free:
                    self.stats.misses += 1
                    self.stats.computed_on_miss += 1
                    return None, False
                entry = self._reserve(e, prefetched=False)
                if entry is not None:
                    self.stats.misses += 1
                    return entry, True
                # every slot is loading or pinned: wait for one load, then ask again
                self.pinned[e] -= 1
                if not self.pinned[e]:
                    del self.pinned[e]
                waiting = next((x for x in self.entries.values() if not x.done.is_set()), None)
            if waiting is None:
                raise RuntimeError(f"every slot of layer {self.layer}'s expert cache is pinned by forwards running now")
            waiting.done.wait()

    # -- the prefetcher's side ---------------------------------------------------------------

    def prefetch(self, ids: Iterable[int]) -> int:
        """Start loading the listed experts that are not resident (at most ``capacity``, in
        order); returns how many were started. Evicts only what no forward uses and no load
        is filling, and never one of ``ids`` for another."""
        ids = list(dict.fromkeys(int(e) for e in ids))[: self.capacity]
        started = []
        with self.lock:
            for e in ids:
                if e in self.entries:
                    continue
                entry = self._reserve(e, prefetched=True, keep=ids)
                if entry is None:
                    break
                self.stats.prefetch_issued += 1
                started.append((e, entry))
        for e, entry in started:
            if self.executor is None:
                self._load(e, entry)
            else:
                self.executor.submit(self._load, e, entry)
        return len(started)

    def drain(self) -> None:
        """Wait for every load in flight (tests, shutdown)."""
        with self.lock:
            pending = [x for x in self.entries.values() if not x.done.is_set()]
        for x in pending:
            x.done.wait()

    # -- slots ------------------------------------------------------------------------------

    def _reserve(self, e: int, prefetched: bool, keep: Iterable[int] = ()) -> _Entry | None:
        """Under the lock: a slot for e (free, or the policy's victim), or None if every
        slot is pinned or loading. The new entry is registered as loading."""
        if self._free:
            slot = self._free.pop()
        else:
            busy = {*self.pinned, *keep, *(k for k, x in self.entries.items() if not x.done.is_set())}
            victim = self.policy.victim(busy)
            if victim is None:
                return None
            old = self.entries.pop(victim)
            self.policy.remove(victim)
            self.stats.evictions += 1
            slot = old.slot
        entry = self.entries[e] = _Entry(slot, prefetched)
        self.policy.insert(e)
        return entry

    def _slot(self, i: int) -> torch.Tensor:
        if self._slots[i] is None:
            self._slots[i] = torch.empty(self.layout.slot_bytes, dtype=torch.uint8, device=self.device)
        return self._slots[i]

    def _load(self, e: int, entry: _Entry) -> None:
        """Fill entry's slot with expert e (on any thread) and publish it."""
        try:
            slot = self._slot(entry.slot)
            if self.device.type == "cpu":
                self.store.read_into(self.layer, e, slot)
            else:
                self._load_to_device(e, slot)
            entry.view = self.build_view(self.layout.views(slot))
            with self.lock:
                self.stats.loads += 1
                self.stats.bytes_moved += self.layout.expert_bytes
        except BaseException as exc:  # the waiter re-raises it; the slot goes back
            entry.error = exc
            with self.lock:
                if self.entries.get(e) is entry:
                    del self.entries[e]
                    self.policy.remove(e)
                    self._free.append(entry.slot)
        finally:
            entry.done.set()

    def _load_to_device(self, e: int, slot: torch.Tensor) -> None:
        """Store -> pinned staging -> device slot on a side stream, finished before the entry
        is published (so the compute stream needs no event to see the weights)."""
        staging = getattr(self._staging, "buf", None)
        if staging is None:
            staging = self._staging.buf = torch.empty(self.layout.slot_bytes, dtype=torch.uint8, pin_memory=True)
        self.store.read_into(self.layer, e, staging)
        with torch.cuda.stream(self._stream):
            slot.copy_(staging, non_blocking=True)
        self._stream.synchronize()

    def _transient(self, e: int) -> ExpertWeights:
        """Expert e computed where it lives: the RAM store's own tensors, or one read from disk."""
        views = self.store.cpu_views(self.layer, e)
        if views is None:
            buf = torch.empty(self.layout.slot_bytes, dtype=torch.uint8)
            self.store.read_into(self.layer, e, buf)
            views = self.layout.views(buf)
            with self.lock:
                self.stats.bytes_moved += self.layout.expert_bytes
        return self.build_view(views)

    @property
    def resident(self) -> list[int]:
        with self.lock:
            return [e for e, x in self.entries.items() if x.done.is_set() and x.error is None]

    @property
    def allocated_bytes(self) -> int:
        return sum(s.numel() for s in self._slots if s is not None)


__all__ = ["LayerCache", "CacheStats", "ON_MISS"]
