"""The planner against the real thing: a trace of the tokens an offloaded model decoded, replayed
by the planner, gives the hit counts the runtime's caches counted (exactly without prefetch,
where both run the same policy objects on the same accesses; closely with it, where the runtime
loads on a background thread)."""

import copy

import pytest
import torch

import hf_tiny
from moekit.inference.engine import Engine
from moekit.inference.sampling import SamplingParams
from moekit.interop import from_pretrained
from moekit.offload.planner import simulate
from moekit.offload.runtime import OffloadConfig, offload_model
from moekit.offload.store import ExpertLayout
from moekit.offload.trace import trace_tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "olmoe"
    torch.manual_seed(0)
    hf_tiny.build("olmoe").save_pretrained(folder)
    return from_pretrained(folder, dtype=torch.float32).eval()


def _offloaded_run(model, slots: int, policy: str, prefetch: bool, n: int = 40):
    """Greedy decode from a one-token prompt (every forward is one token, as in the trace's
    replay) with ``slots`` experts per layer; -> (forwarded token ids, the runtime's counters)."""
    m = copy.deepcopy(model)
    slot_bytes = ExpertLayout.of(m.moe_layers()[0].experts.state_dict()).slot_bytes
    layers = len(m.moe_layers())
    rt = offload_model(m, OffloadConfig(cache_gb=slots * slot_bytes * layers / 1e9 * 1.0001, policy=policy,
                                        prefetch=prefetch, store="ram"))
    try:
        prompt = [7]
        seq = Engine(m, max_batch=1).generate([prompt], SamplingParams(max_new_tokens=n, temperature=0))[0]
        rt.drain()
        return prompt + seq.output_ids[:-1], rt.stats  # the last token is sampled, never forwarded
    finally:
        rt.close()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_the_planner_replays_a_real_offloaded_decode_exactly(model, policy):
    E, K = model.cfg.moe.num_experts, model.cfg.moe.top_k
    for slots in (K, E // 2):
        ids, stats = _offloaded_run(model, slots, policy, prefetch=False)
        predicted = simulate(trace_tokens(model, ids, "olmoe"), slots, policy)
        assert (predicted.hits, predicted.misses) == (stats.hits, stats.misses)
        assert 0 < stats.misses < stats.hits + stats.misses  # the budget forced real evictions


def test_the_planner_predicts_a_real_run_with_prefetch(model):
    K = model.cfg.moe.top_k
    ids, stats = _offloaded_run(model, K + 1, "lru", prefetch=True)
    predicted = simulate(trace_tokens(model, ids, "olmoe"), K + 1, "lru", prefetch=True)
    real = stats.hits / (stats.hits + stats.misses)
    assert abs(predicted.hit_rate - real) <= 0.05, (predicted, stats)
