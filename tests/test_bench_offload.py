"""bench offload on a tiny random MoE: the runs happen and the report's fields are sane."""

import json

import pytest

from moekit.bench.offload import cache_accesses, predicted_hits
from moekit.cli import main


def test_bench_offload_quick_reports_sane_fields(tmp_path, capsys):
    out = tmp_path / "offload.json"
    assert main(["bench", "offload", "--quick", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "decode tokens/s: memory" in text and "hit rate" in text
    rep = json.loads(out.read_text())
    assert rep["same_tokens"] is True and rep["repeats"] == 1
    assert set(rep["decode_tokens_per_s"]) == {"memory", "offload", "offload_noprefetch"}
    assert all(v > 0 for v in rep["decode_tokens_per_s"].values())
    assert 0 < rep["slots_per_layer"] < rep["sizes"]["experts_per_layer"]
    assert 0 <= rep["hit_rate"] <= 1 and rep["evictions"] > 0 and rep["bytes_per_token"] > 0
    # without prefetch the cache makes exactly the replay's decisions
    assert abs(rep["hit_rate_no_prefetch"] - rep["hit_rate_replay"]) < 1e-9
    assert rep["peak_rss_over_start"]["memory"] > 0 and rep["meta"]["load_avg_start"]
    # the planner on a `moekit trace` of the same tokens, and its error against the measured rates
    assert "planner (moekit trace of the same tokens" in text
    for k in ("hit_rate_planner", "hit_rate_planner_prefetch"):
        assert 0 <= rep[k] <= 1
    assert rep["planner_error_points"] == pytest.approx(100 * abs(rep["hit_rate_no_prefetch"] - rep["hit_rate_planner"]))
    assert rep["planner_error_points_prefetch"] == pytest.approx(100 * abs(rep["hit_rate"] - rep["hit_rate_planner_prefetch"]))
    # the offloaded runs streamed the model: their load holds far less than every expert
    load = rep["load_peak_rss_over_start"]
    assert set(load) == set(rep["decode_tokens_per_s"]) and all(v > 0 for v in rep["load_seconds"].values())


def test_replay_counts_the_decode_accesses_of_a_warmed_cache():
    # prefill of 2 tokens (top-2) touches experts 0, 1, 3 in id order; then decode steps
    layer = [[3, 0, 1, 0], [1, 2], [3, 1]]
    assert cache_accesses(layer[0], 2) == [0, 1, 3] and cache_accesses(layer[1], 2) == [1, 2]
    # capacity 2, LRU: warm {1, 3}; decode: 1 hit, 2 miss (evicts 3), 3 miss, 1 miss (1 was evicted by 3)
    assert predicted_hits(layer, 1, "lru", 2, 2) == (1, 4)
