"""The offload planner's replay: Belady against a brute-force optimum and the textbook example,
Belady >= every online policy, LRU/LFU equal to driving the policy objects by hand, prefetch
accounting, the speed model, and `moekit plan-offload` on a real trace file."""

import json
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.cli import main
from moekit.offload.plan_report import parse_cache_sizes
from moekit.offload.planner import (CacheResult, belady_hits, online_hits, predict_hit_rate, predict_speed,
                                    prefetch_accuracy, simulate)
from moekit.offload.policies import LFU, LRU
from moekit.offload.trace import NO_GUESS, Trace, TraceHeader, config_fingerprint

sequences = st.lists(st.integers(0, 5), min_size=0, max_size=60)


def brute_force_max_hits(keys: tuple[int, ...], capacity: int) -> int:
    """Try every eviction choice (the definition of the optimum, not Belady's rule)."""

    @lru_cache(maxsize=None)
    def best(i: int, resident: frozenset) -> int:
        if i == len(keys):
            return 0
        k = keys[i]
        if k in resident:
            return 1 + best(i + 1, resident)
        if capacity == 0:
            return best(i + 1, resident)
        if len(resident) < capacity:
            return best(i + 1, resident | {k})
        return max(best(i + 1, (resident - {v}) | {k}) for v in resident)

    return best(0, frozenset())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=14), st.integers(0, 4))
def test_belady_equals_the_brute_force_optimum(keys, capacity):
    assert belady_hits(np.array(keys, dtype=np.int64), capacity) == brute_force_max_hits(tuple(keys), capacity)


@settings(max_examples=200, deadline=None)
@given(sequences, st.integers(0, 7))
def test_belady_beats_every_online_policy(keys, capacity):
    a = np.array(keys, dtype=np.int64)
    b = belady_hits(a, capacity)
    assert b >= online_hits(a, capacity, "lru") and b >= online_hits(a, capacity, "lfu")
    assert b <= len(keys) - len(set(keys))  # every first access misses


def test_belady_on_the_textbook_sequence():
    # Silberschatz et al., Operating System Concepts, the optimal page replacement figure:
    # 20 references, 3 frames, 9 page faults (LRU: 12 faults).
    refs = np.array([7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1])
    assert len(refs) - belady_hits(refs, 3) == 9
    assert len(refs) - online_hits(refs, 3, "lru") == 12


def _trace(experts: np.ndarray, guess: np.ndarray | None = None, expert_bytes: int = 1000,
           decode_tps: float | None = None) -> Trace:
    L, T, K = experts.shape
    E = int(experts.max()) + 1
    cfg = {"stand-in": True}
    header = TraceHeader(family="moekit", moe_layers=list(range(L)), num_experts=E, top_k=K,
                         fingerprint=config_fingerprint(cfg), config=cfg, expert_bytes=expert_bytes,
                         expert_dtype="torch.float32", model="synthetic", source="random", num_tokens=T,
                         decode_tokens_per_s=decode_tps)
    if guess is None:
        guess = np.full_like(experts, NO_GUESS)
    return Trace(header, experts.astype(np.int16), guess.astype(np.int16), np.zeros(T, np.int32))


def _random_routing(rng, L=3, T=200, K=2, E=8, skew=1.2) -> np.ndarray:
    """[L, T, K] distinct experts per token, Zipf-skewed popularity (as trained routers are)."""
    p = 1.0 / np.arange(1, E + 1) ** skew
    p /= p.sum()
    return np.stack([np.stack([rng.choice(E, K, replace=False, p=p) for _ in range(T)]) for _ in range(L)])


@pytest.mark.parametrize("cls", [LRU, LFU])
def test_online_replay_equals_driving_the_policy_objects_by_hand(cls):
    trace = _trace(_random_routing(np.random.default_rng(0)))
    for capacity in (1, 2, 3, 5, 8):
        hits = 0
        for layer in trace.experts:
            policy = cls()
            for e in layer.reshape(-1).tolist():  # token by token, experts in rank order
                policy.access(e)
                if e in policy:
                    hits += 1
                    continue
                if len(policy) >= capacity:
                    policy.remove(policy.victim())
                policy.insert(e)
        r = simulate(trace, capacity, cls.name)
        assert (r.hits, r.misses) == (hits, trace.experts.size - hits)
        assert predict_hit_rate(trace, capacity, cls.name) == pytest.approx(hits / trace.experts.size)


def test_belady_bounds_lru_and_lfu_on_whole_traces():
    trace = _trace(_random_routing(np.random.default_rng(1)))
    for capacity in (1, 2, 4, 6):
        best = simulate(trace, capacity, "belady").hit_rate
        assert best >= simulate(trace, capacity, "lru").hit_rate
        assert best >= simulate(trace, capacity, "lfu").hit_rate


def test_prefetch_accounting():
    rng = np.random.default_rng(2)
    experts = _random_routing(rng)
    L, T, K = experts.shape
    # No guesses at all: prefetch changes nothing.
    plain = simulate(_trace(experts), 3, "lru")
    none = simulate(_trace(experts), 3, "lru", prefetch=True)
    assert (none.hits, none.prefetch_loads) == (plain.hits, 0)
    # Perfect guesses from layer 1 on, room for K: those layers never miss.
    perfect = experts.copy()
    perfect[0] = NO_GUESS
    r = simulate(_trace(experts, perfect), K, "lru", prefetch=True)
    first_layer = simulate(_trace(experts[:1]), K, "lru")
    assert r.hits == first_layer.hits + (L - 1) * T * K
    assert r.prefetch_useful == r.prefetch_loads <= (L - 1) * T * K
    assert prefetch_accuracy(_trace(experts, perfect)) == 1.0
    # Random guesses: every count stays consistent.
    guess = _random_routing(rng)
    guess[0] = NO_GUESS
    for policy in ("lru", "lfu"):
        for capacity in (0, 1, 2, 4, 8):
            r = simulate(_trace(experts, guess), capacity, policy, prefetch=True)
            assert r.hits + r.misses == experts.size and r.prefetch_useful <= r.prefetch_loads
            assert r.prefetch_loads <= (L - 1) * T * K
            if capacity == 0:
                assert (r.hits, r.prefetch_loads) == (0, 0)


def test_predicted_speed_from_bytes_moved():
    r = CacheResult("lru", 2, hits=60, misses=40, prefetch_loads=20, prefetch_useful=10, tokens=10)
    s = predict_speed(r, expert_bytes=10**6, bandwidth_gbs=1.0, compute_tokens_per_s=100.0)
    assert s.demand_bytes_per_token == 4e6 and s.prefetch_bytes_per_token == 2e6
    # prefetch (2 ms) hides under compute (10 ms); the demand loads (4 ms) stall
    assert s.seconds_per_token == pytest.approx(0.014) and s.tokens_per_s == pytest.approx(1 / 0.014)
    slow = predict_speed(r, expert_bytes=10**6, bandwidth_gbs=0.1, compute_tokens_per_s=None)
    assert slow.seconds_per_token == pytest.approx(0.02 + 0.04)


def test_cache_size_parsing():
    sizes = parse_cache_sizes("2, 0.5GB,512MB,8")
    assert [s.experts for s in sizes] == [2, None, None, 8]
    assert [s.nbytes for s in sizes] == [None, 5e8, 5.12e8, None]
    for bad in ("", "two", "1.5", "0", "3TB", "2,,4"):
        with pytest.raises(ValueError):
            parse_cache_sizes(bad)


def test_plan_offload_cli_json_and_plot(tmp_path, capsys):
    trace = _trace(_random_routing(np.random.default_rng(3)), expert_bytes=10**6, decode_tps=50.0)
    trace.save(tmp_path / "t.trace")
    argv = ["plan-offload", str(tmp_path / "t.trace"), "--cache-sizes", "2,4,12MB", "--prefetch",
            "--bandwidth", "2", "--json", "--plot", str(tmp_path / "p.png")]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert [r["experts_per_layer"] for r in rows] == [2] * 5 + [4] * 5 + [4] * 5  # 12 MB / (1 MB x 3 layers)
    for i in range(0, len(rows), 5):
        by = {r["policy"]: r for r in rows[i: i + 5]}
        assert by["belady"]["hit_rate"] >= max(by["lru"]["hit_rate"], by["lfu"]["hit_rate"])
        assert by["lru"]["hit_rate"] == simulate(trace, by["lru"]["experts_per_layer"], "lru").hit_rate
    assert out["bandwidth_gbs"] == 2 and out["prefetch_accuracy"] is None
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_offload_measures_bandwidth_and_prints_a_table(tmp_path, capsys):
    _trace(_random_routing(np.random.default_rng(4), T=20)).save(tmp_path / "t.trace")
    assert main(["plan-offload", str(tmp_path / "t.trace"), "--cache-sizes", "3", "--policies", "belady"]) == 0
    out = capsys.readouterr().out
    assert "measured here" in out and "belady" in out and "lru" not in out
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace"]  # the probe file is gone


@pytest.mark.parametrize("argv, needle", [
    (["--cache-sizes", "1KB", "--bandwidth", "1"], "cache size 1KB holds no expert per layer"),
    (["--cache-sizes", "2", "--policies", "lru,fifo"], "--policies must be a comma list of lru, lfu, belady"),
    (["--cache-sizes", "2", "--bandwidth", "fast"], "--bandwidth must be 'measured' or a number"),
    (["--cache-sizes", "2", "--bandwidth", "0"], "--bandwidth must be 'measured' or a number"),
])
def test_plan_offload_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    _trace(_random_routing(np.random.default_rng(5), T=10), expert_bytes=10**6).save(tmp_path / "t.trace")
    assert main(["plan-offload", str(tmp_path / "t.trace"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_a_damaged_trace_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "t.trace"
    _trace(_random_routing(np.random.default_rng(6), T=50)).save(path)
    path.write_bytes(path.read_bytes()[:-100])
    assert main(["plan-offload", str(path), "--cache-sizes", "2", "--bandwidth", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated or not a routing trace" in err and len(err.splitlines()) == 1
    (tmp_path / "x.trace").write_text("not a trace")
    assert main(["plan-offload", str(tmp_path / "x.trace"), "--cache-sizes", "2", "--bandwidth", "1"]) == 2
    assert "not a routing trace" in capsys.readouterr().err


def test_plan_rows_reports_progress_after_each_replay():
    from moekit.offload.plan_report import plan_rows

    seen = []
    trace = _trace(_random_routing(np.random.default_rng(7), T=30))
    rows = plan_rows(trace, parse_cache_sizes("2,3"), ["lru", "belady"], True, 1.0,
                     progress=lambda done, total, label: seen.append((done, total, label)))
    assert [r["policy"] for r in rows] == ["lru", "belady", "lru+prefetch"] * 2
    assert seen[0] == (1, 6, "lru with 2 experts per layer") and seen[-1][:2] == (6, 6)


def test_warmup_tokens_fill_the_cache_and_are_not_counted():
    """A prompt's tokens warm the caches (the prefill before a decode) and only the later
    tokens count: the same numbers as driving the policy over the warm-up, then counting."""
    from moekit.offload.policies import make_policy, replay

    rng = np.random.default_rng(3)
    experts = _random_routing(rng)
    L, T, K = experts.shape
    trace, w = _trace(experts), T // 3
    for policy in ("lru", "lfu"):
        for capacity in (1, 3, 5):
            hits = 0
            for layer in experts:
                p = make_policy(policy)
                replay(p, capacity, layer[:w].reshape(-1).tolist())
                hits += replay(p, capacity, layer[w:].reshape(-1).tolist()).hits
            r = simulate(trace, capacity, policy, warmup=w)
            assert (r.hits, r.accesses, r.tokens) == (hits, L * (T - w) * K, T - w)
    perfect = experts.copy()
    perfect[0] = NO_GUESS
    r = simulate(_trace(experts, perfect), K, "lru", prefetch=True, warmup=w)
    cold_first = simulate(_trace(experts[:1]), K, "lru", warmup=w)
    assert r.hits == cold_first.hits + (L - 1) * (T - w) * K and r.prefetch_useful == r.prefetch_loads
    assert simulate(trace, 2, "belady", warmup=w).accesses == L * (T - w) * K
    with pytest.raises(ValueError, match="warmup"):
        simulate(trace, 2, "lru", warmup=T)
