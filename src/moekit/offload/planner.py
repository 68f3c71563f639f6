"""The offload planner: replay a routing trace through per-layer expert caches, offline.

Shape legend: T tokens, L MoE layers, K experts per token, C cache size (experts per layer).

Every MoE layer has its own cache of C experts (mixtral-offloading's layout), so each layer's
accesses are replayed alone: the K experts of token 0, in rank order, then token 1's, ...
(an [T, K] array read row by row). Policies:

- ``lru``, ``lfu``: the offload cache's own policy objects (``policies.py``), so the planner
  and a real run make the same decisions.
- ``belady``: Belady's optimal eviction (1966), evict the resident expert whose next use is
  farthest away. No online policy can beat it on the same accesses: the upper bound on hit
  rate for a cache that loads only on demand. O(n log n) per layer with next-use indices and
  a heap with lazy deletion.
- ``prefetch`` (with lru or lfu): before a layer runs for a token, the trace's guess for it
  (the previous layer's hidden state through this layer's router, ``trace.py``) is loaded too.
  A prefetch load is not a demand access (an LFU count is not raised by it); it evicts like a
  miss but never another of the token's guesses; a guessed expert that the token then uses is
  a hit. Prefetch can beat Belady: Belady bounds demand loading only.

Predicted decode speed (``predict_speed``): per token, demand loads stall the decode, while
prefetch loads overlap the compute (the decode time measured in memory when the trace was
recorded):  seconds/token = max(compute, prefetch bytes / bw) + demand bytes / bw.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass

import numpy as np

from moekit.offload.policies import make_policy, replay
from moekit.offload.trace import NO_GUESS, Trace, load_trace

ONLINE = ("lru", "lfu")
POLICIES = (*ONLINE, "belady")


@dataclass(frozen=True)
class CacheResult:
    """Counts over all MoE layers of one replay."""

    policy: str  # lru, lfu, belady; "+prefetch" appended when prefetching
    cache_size: int  # experts per layer
    hits: int  # demand accesses served from the cache
    misses: int  # demand accesses that had to load the expert (stall the decode)
    prefetch_loads: int = 0  # experts loaded ahead on a guess
    prefetch_useful: int = 0  # of those, asked for by a later demand before their eviction
    tokens: int = 0

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def loads_per_token(self) -> float:
        return (self.misses + self.prefetch_loads) / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate, "loads_per_token": self.loads_per_token}


# --- one layer -------------------------------------------------------------------------------


def belady_hits(keys: np.ndarray, capacity: int, count_from: int = 0) -> int:
    """Hits of Belady's optimal eviction over ``keys`` (a 1-D sequence) with ``capacity`` slots,
    counting the accesses from index ``count_from`` on (the earlier ones warm the cache).

    1. next_use[i]: the index of the next access to keys[i] (n when none), one backward pass.
    2. Forward pass: a hit needs nothing; a miss in a full cache evicts the resident key whose
       next use is farthest. The heap holds (-next use, key) for every access; an entry is
       stale when its key was accessed again since (its resident next use changed) or evicted.
       Next-use indices of different accesses differ, so a stale entry never looks current.
    """
    seq = [int(k) for k in keys]
    n = len(seq)
    next_use, last = [n] * n, {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(seq[i], n)
        last[seq[i]] = i
    resident: dict[int, int] = {}  # key -> index of its next use
    heap: list[tuple[int, int]] = []
    hits = 0
    for i, k in enumerate(seq):
        if k in resident:
            hits += i >= count_from
        elif capacity == 0:
            continue
        elif len(resident) >= capacity:
            while True:
                neg, victim = heapq.heappop(heap)
                if resident.get(victim) == -neg:
                    break
            del resident[victim]
        resident[k] = next_use[i]
        heapq.heappush(heap, (-next_use[i], k))
    return hits


def online_hits(keys: np.ndarray, capacity: int, policy: str, count_from: int = 0) -> int:
    """Hits of an online policy from ``policies.py`` over ``keys`` (demand loading only),
    counting from index ``count_from`` on (the earlier accesses warm the same policy)."""
    p = make_policy(policy)
    replay(p, capacity, (int(k) for k in keys[:count_from]))
    return replay(p, capacity, (int(k) for k in keys[count_from:])).hits


def prefetch_replay(ids_TK: np.ndarray, guess_TK: np.ndarray, capacity: int, policy: str,
                    warmup: int = 0) -> tuple[int, int, int]:
    """One layer with prefetch -> (hits, prefetch loads, useful prefetch loads: those a later
    demand found before they were evicted); see the module docstring for the rules. Guesses of
    NO_GUESS (the first MoE layer) load nothing. The first ``warmup`` tokens run but are not
    counted."""
    p = make_policy(policy)
    hits = loads = useful = 0
    unused: set[int] = set()  # prefetched, not yet asked for
    for t, (ids, guess) in enumerate(zip(ids_TK.tolist(), guess_TK.tolist())):
        if t == warmup:
            hits = loads = useful = 0
            unused.clear()  # a warm-up prefetch found later is not this window's useful load
        guess = [g for g in guess if g != NO_GUESS]
        for g in guess:
            if g in p or capacity == 0:
                continue
            if len(p) >= capacity:
                victim = p.victim(pinned=guess)
                if victim is None:  # the cache is full of this token's guesses
                    continue
                p.remove(victim)
                unused.discard(victim)
            p.insert(g)
            unused.add(g)
            loads += 1
        for e in ids:
            p.access(e)
            if e in p:
                hits += 1
                if e in unused:
                    useful += 1
                    unused.discard(e)
                continue
            if capacity == 0:
                continue
            if len(p) >= capacity:
                victim = p.victim()
                p.remove(victim)
                unused.discard(victim)
            p.insert(e)
    return hits, loads, useful


# --- a whole trace -----------------------------------------------------------------------------


def simulate(trace: Trace | str, cache_size: int, policy: str = "lru", prefetch: bool = False,
             warmup: int = 0) -> CacheResult:
    """Replay every MoE layer of ``trace`` (a Trace or a path) through a cache of ``cache_size``
    experts per layer run by ``policy`` (lru, lfu or belady; prefetch with lru or lfu). The
    first ``warmup`` tokens (a prompt, whose prefill fills the cache before decoding) warm the
    caches and are not counted: the result is the later tokens' (``moekit bench offload``
    compares it with a real decode's counters)."""
    trace = load_trace(trace) if not isinstance(trace, Trace) else trace
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    if prefetch and policy == "belady":
        raise ValueError("prefetch applies to the online policies (lru, lfu); belady bounds demand loading")
    if cache_size < 0:
        raise ValueError(f"cache_size must be >= 0; got {cache_size}")
    if not 0 <= warmup < trace.num_tokens:
        raise ValueError(f"warmup must be in [0, {trace.num_tokens}) tokens; got {warmup}")
    hits = loads = useful = 0
    K = trace.header.top_k
    for layer in range(trace.num_layers):
        ids_TK = trace.experts[layer]
        if prefetch:
            h, n, u = prefetch_replay(ids_TK, trace.guess[layer], cache_size, policy, warmup)
            hits, loads, useful = hits + h, loads + n, useful + u
        elif policy == "belady":
            hits += belady_hits(ids_TK.reshape(-1), cache_size, warmup * K)
        else:
            hits += online_hits(ids_TK.reshape(-1), cache_size, policy, warmup * K)
    accesses = trace.experts[:, warmup:].size
    name = f"{policy}+prefetch" if prefetch else policy
    return CacheResult(name, cache_size, hits, accesses - hits, loads, useful, trace.num_tokens - warmup)


def predict_hit_rate(trace: Trace | str, cache_size: int, policy: str = "lru", prefetch: bool = False) -> float:
    """The hit rate in [0, 1] a real run with this cache should see (``moekit bench offload``
    compares it with one)."""
    return simulate(trace, cache_size, policy, prefetch).hit_rate


def prefetch_accuracy(trace: Trace) -> float | None:
    """Of the guessed experts, the fraction the token then used (None: the trace has no guess)."""
    g = trace.guess
    guessed = g != NO_GUESS  # [L, T, K]
    if not guessed.any():
        return None
    used = (g[..., :, None] == trace.experts[..., None, :]).any(-1)  # [L, T, K]
    return float(used[guessed].mean())


@dataclass(frozen=True)
class Speed:
    demand_bytes_per_token: float
    prefetch_bytes_per_token: float
    seconds_per_token: float | None  # None: no compute time known and nothing to move
    tokens_per_s: float | None


def predict_speed(result: CacheResult, expert_bytes: int, bandwidth_gbs: float,
                  compute_tokens_per_s: float | None) -> Speed:
    """Decode tokens/s from the bytes a token must move (see the module docstring). Without a
    measured compute speed the prediction is transfer-bound: an upper limit."""
    T = max(result.tokens, 1)
    demand = result.misses * expert_bytes / T
    ahead = result.prefetch_loads * expert_bytes / T
    bw = bandwidth_gbs * 1e9
    compute = 1.0 / compute_tokens_per_s if compute_tokens_per_s else 0.0
    seconds = max(compute, ahead / bw) + demand / bw
    return Speed(demand, ahead, seconds or None, 1.0 / seconds if seconds > 0 else None)


__all__ = ["CacheResult", "Speed", "simulate", "predict_hit_rate", "predict_speed", "prefetch_accuracy",
           "belady_hits", "online_hits", "prefetch_replay", "POLICIES", "ONLINE"]
