"""Cache-eviction policies over hashable keys: which resident entry to drop when a new one
needs room. Pure Python, no torch and no model code, so the offload cache (``cache.py``) and
an offline replay of a routing trace (the planner) run the very same decisions.

A policy tracks the keys that are resident; the cache owns the data and the byte budget:

    policy.access(key)      # every lookup, hit or miss, before anything else
    key in policy           # a hit?
    policy.victim(pinned)   # on a miss without room: the key to drop (never one in pinned)
    policy.remove(key)      # the cache dropped it (eviction, or it gave up a prefetch)
    policy.insert(key)      # the cache now holds it

``access`` on a non-resident key is how a frequency policy learns about demand it did not
serve. Keys are whatever the caller uses; the offload cache uses ``(layer, expert)``.

- ``LRU``: evict the least recently accessed key (mixtral-offloading's per-layer cache).
- ``LFU``: evict the least frequently accessed key, ties to the least recent. Frequencies
  count every access since the policy was made, resident or not ("perfect" LFU): expert
  popularity is a property of the model and the data, which a count reset at each eviction
  would forget (MoE-Infinity's activation-frequency cache keeps the history for this reason).

``replay(policy, capacity, keys)`` runs a sequence of accesses through a cache of
``capacity`` entries and returns the hits: the planner's simulator and a test oracle.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Collection, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol


class EvictionPolicy(Protocol):
    """What the cache asks of a policy (see the module docstring for the call order)."""

    name: str

    def access(self, key: Hashable) -> None: ...

    def insert(self, key: Hashable) -> None: ...

    def remove(self, key: Hashable) -> None: ...

    def victim(self, pinned: Collection[Hashable] = ()) -> Hashable | None: ...

    def __contains__(self, key: Hashable) -> bool: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Hashable]: ...


class LRU:
    """Least recently used: resident keys in access order, oldest first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def access(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def insert(self, key: Hashable) -> None:
        if key in self._order:
            raise KeyError(f"{key!r} is already resident")
        self._order[key] = None  # newest: an insert follows the access that missed

    def remove(self, key: Hashable) -> None:
        del self._order[key]

    def victim(self, pinned: Collection[Hashable] = ()) -> Hashable | None:
        return next((k for k in self._order if k not in pinned), None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._order)


class LFU:
    """Least frequently used, ties to the least recently used. A victim costs a scan of the
    resident keys: caches here hold tens of experts per layer, where a heap's upkeep on every
    access would cost more than the scan on a miss."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: Counter[Hashable] = Counter()  # every access since creation, resident or not
        self._recent = LRU()  # the resident keys, for the tie-break

    def access(self, key: Hashable) -> None:
        self._count[key] += 1
        self._recent.access(key)

    def insert(self, key: Hashable) -> None:
        self._recent.insert(key)

    def remove(self, key: Hashable) -> None:
        self._recent.remove(key)

    def victim(self, pinned: Collection[Hashable] = ()) -> Hashable | None:
        best, best_count = None, None
        for k in self._recent:  # oldest first, so the first minimum is the least recent one
            if k not in pinned and (best_count is None or self._count[k] < best_count):
                best, best_count = k, self._count[k]
        return best

    def frequency(self, key: Hashable) -> int:
        return self._count[key]

    def __contains__(self, key: Hashable) -> bool:
        return key in self._recent

    def __len__(self) -> int:
        return len(self._recent)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._recent)


POLICIES = {"lru": LRU, "lfu": LFU}


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by its exact name (``POLICIES``); ValueError listing the known ones."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; known: {', '.join(POLICIES)}")
    return POLICIES[name]()


@dataclass(frozen=True)
class ReplayResult:
    hits: int
    misses: int
    evictions: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def replay(policy: EvictionPolicy | str, capacity: int, keys: Iterable[Hashable]) -> ReplayResult:
    """Accesses ``keys`` in order through a cache of ``capacity`` entries run by ``policy``
    (an instance, which keeps its state, or a name): every miss inserts the key, evicting
    the policy's victim when full. capacity 0 misses everything."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0; got {capacity}")
    p = make_policy(policy) if isinstance(policy, str) else policy
    hits = misses = evictions = 0
    for key in keys:
        p.access(key)
        if key in p:
            hits += 1
            continue
        misses += 1
        if capacity == 0:
            continue
        if len(p) >= capacity:
            p.remove(p.victim())
            evictions += 1
        p.insert(key)
    return ReplayResult(hits, misses, evictions)


__all__ = ["EvictionPolicy", "LRU", "LFU", "POLICIES", "make_policy", "replay", "ReplayResult"]
