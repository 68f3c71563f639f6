"""Eviction policies against a plain reference: timestamps and counts, victims by min()."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.offload.policies import LFU, LRU, POLICIES, make_policy, replay


def reference_replay(name: str, capacity: int, keys: list) -> tuple[int, list]:
    """(hits, victims in order): resident keys in a dict of last-access times; LFU counts all
    accesses ever made and breaks ties by the older last access."""
    last, count, resident, hits, victims = {}, {}, set(), 0, []
    for t, key in enumerate(keys):
        last[key], count[key] = t, count.get(key, 0) + 1
        if key in resident:
            hits += 1
            continue
        if capacity == 0:
            continue
        if len(resident) >= capacity:
            order = (lambda k: last[k]) if name == "lru" else (lambda k: (count[k], last[k]))
            v = min(resident, key=order)
            resident.remove(v)
            victims.append(v)
        resident.add(key)
    return hits, victims


class Recording:
    """A policy wrapper that records the victims the cache takes."""

    def __init__(self, inner):
        self.inner, self.victims, self.name = inner, [], inner.name

    def victim(self, pinned=()):
        v = self.inner.victim(pinned)
        self.victims.append(v)
        return v

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def __contains__(self, key):
        return key in self.inner

    def __len__(self):
        return len(self.inner)


keys_st = st.lists(st.integers(0, 9), max_size=200)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(POLICIES)), capacity=st.integers(0, 8), keys=keys_st)
def test_replay_matches_reference(name, capacity, keys):
    rec = Recording(make_policy(name))
    got = replay(rec, capacity, keys)
    hits, victims = reference_replay(name, capacity, keys)
    assert (got.hits, rec.victims) == (hits, victims)
    assert got.hits + got.misses == len(keys) and got.evictions == len(victims)
    assert len(rec.inner) == min(capacity, len(set(keys)))


@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(1, 6), keys=keys_st)
def test_lru_is_a_stack_algorithm(capacity, keys):
    """LRU's inclusion property: a bigger cache never hits less (Mattson et al., 1970)."""
    assert replay("lru", capacity + 1, keys).hits >= replay("lru", capacity, keys).hits


@given(name=st.sampled_from(sorted(POLICIES)), keys=keys_st)
def test_cold_misses_only_when_everything_fits(name, keys):
    r = replay(name, 10, keys)
    assert (r.misses, r.evictions) == (len(set(keys)), 0)


@pytest.mark.parametrize("cls", [LRU, LFU])
def test_victim_skips_pinned_keys_and_none_when_all_pinned(cls):
    p = cls()
    for k in "abc":
        p.access(k)
        p.insert(k)
    assert p.victim() == "a"
    assert p.victim(pinned={"a"}) == "b"
    assert p.victim(pinned={"a", "b", "c"}) is None
    p.remove("a")
    assert list(p) == ["b", "c"] and "a" not in p and len(p) == 2
    with pytest.raises(KeyError):
        p.insert("b")


def test_lru_access_refreshes_and_lfu_remembers_evicted_counts():
    lru = LRU()
    for k in "ab":
        lru.access(k)
        lru.insert(k)
    lru.access("a")
    assert lru.victim() == "b"
    lfu = LFU()
    for k in "aab":
        lfu.access(k)
    lfu.insert("a")
    lfu.remove("a")  # evicted: its two accesses still count when it comes back
    lfu.insert("b")
    lfu.insert("a")
    assert lfu.frequency("a") == 2 and lfu.victim() == "b"


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'; known: lru, lfu"):
        make_policy("fifo")
    with pytest.raises(ValueError, match="capacity"):
        replay("lru", -1, [])


def test_prefetch_guesses_come_in_router_rank_order_not_by_expert_id():
    """One decode token's guesses load most likely first, as the planner replays them; over
    several tokens the most chosen expert leads."""
    import torch

    import moekit
    from moekit.offload.prefetch import guess_experts

    torch.manual_seed(0)
    moe = moekit.MoEConfig(d_model=32, d_expert=16, num_experts=8, top_k=3)
    model = moekit.MoETransformer(moekit.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                                                     moe=moe)).eval()
    block = model.blocks[1]
    h = torch.randn(40, 1, 1, 32)
    with torch.no_grad():
        ids = [block.ffn.router(block.ffn_norm(x).reshape(1, 32)).ids[0].tolist() for x in h]
    unsorted = [i for i, r in enumerate(ids) if r != sorted(r)]
    assert unsorted  # random tokens whose top-k is not in id order
    for i in unsorted[:5]:
        assert guess_experts(block, h[i], limit=8) == ids[i]
    assert guess_experts(block, h[unsorted[0]], limit=2) == ids[unsorted[0]][:2]
    both = torch.cat([h[unsorted[0]], h[unsorted[0]], h[unsorted[1]]], dim=1)  # [1, 3, D]
    first = guess_experts(block, both, limit=8)
    a, b = ids[unsorted[0]], ids[unsorted[1]]
    counts = [2 * a.count(e) + b.count(e) for e in first]
    assert set(first) == set(a) | set(b) and counts == sorted(counts, reverse=True)  # most chosen first
