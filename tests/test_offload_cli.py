"""Offloading from the command line and the server: generate --json with the cache's
counters (same tokens as in memory), serve's /v1/moe/stats, and bad flags as one line."""

import json

import httpx
import pytest
import torch

from moekit.cli import main
from moekit.inference.loading import load_for_inference
from moekit.offload.cli import apply_offload
from moekit.offload.runtime import OffloadConfig
from moekit.serve.cli import build_state
from moekit.serve.server import BackgroundServer
from serve_helpers import MODEL, model_folder
from cli_helpers import usage_error

PROMPT = "the router learns which expert"
# tiny_model: 2 MoE layers x 4 experts of (128x64 + 64x64) fp32 = 48 KiB: 0.0002 GB = 2 slots per layer
BUDGET = "0.0002"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("offload_cli"))


def _generate(folder, capsys, *extra):
    assert main(["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0",
                 "--json", *extra]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


@pytest.mark.parametrize("flags", [["--cache-policy", "lfu", "--no-prefetch"],
                                   ["--offload-experts", "--on-miss", "compute", "--offload-store", "ram"]])
def test_generate_json_reports_the_cache_and_matches_in_memory_tokens(folder, capsys, tmp_path, flags):
    ref, _ = _generate(folder, capsys)
    assert "offload" not in ref
    rec, err = _generate(folder, capsys, "--expert-cache-gb", BUDGET, "--offload-dir", str(tmp_path / "store"), *flags)
    assert rec["output_ids"] == ref["output_ids"]
    o = rec["offload"]
    assert o["slots_per_layer"] == 2 and o["layers"] == 2 and "experts offloaded" in err
    assert o["misses"] > 0 and o["hits"] + o["misses"] >= 2 * 2 * 12  # 2 layers x top-2 x tokens run
    assert 0 <= o["hit_rate"] <= 1 and o["bytes_per_token"] == o["bytes_moved"] / (len(ref["prompt_ids"]) + 12)
    assert o["cache_allocated_bytes"] <= 2 * 2 * 49152 + 4 * 64
    d, steps = o["decode"], len(rec["output_ids"]) - 1  # the first token comes from the prefill
    assert d["hits"] + d["misses"] == 2 * 2 * steps and d["bytes_per_token"] == d["bytes_moved"] / steps
    assert d["bytes_moved"] < o["bytes_moved"] and d["misses"] <= o["misses"]
    if "--on-miss" in flags:
        assert o["computed_on_miss"] > 0 and o["store"] == "ram"
    else:
        assert o["evictions"] > 0 and o["policy"] == "lfu" and o["prefetch_issued"] == 0
        assert (tmp_path / "store" / "offload.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--expert-cache-gb", "0.00001"], "holds no expert per MoE layer: one expert takes 0.0492 MB"),
    (["--offload-experts"], "--offload-experts needs --expert-cache-gb"),
    (["--cache-policy", "lfu"], "--cache-policy applies to offloaded experts; add --expert-cache-gb"),
    (["--expert-cache-gb", "0"], "--expert-cache-gb"),
    (["--expert-cache-gb", "1", "--cache-policy", "fifo"], "--cache-policy"),
])
def test_bad_offload_flags_are_one_line_exit_2(folder, capsys, extra, message):
    assert message in usage_error(["generate", str(folder), "--prompt", PROMPT, *extra], capsys)


def test_serve_stats_report_the_expert_cache(folder):
    model, tok, defaults = load_for_inference(folder, dtype="fp32")
    apply_offload(model, OffloadConfig(cache_gb=float(BUDGET)), quiet=True)
    state = build_state(model, tok, defaults, MODEL, max_batch=2, max_waiting=4)
    with BackgroundServer(state) as url:
        assert "offload" not in httpx.get(url + "/health").json()
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 6,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200
        o = httpx.get(url + "/v1/moe/stats").json()["offload"]
    model.offload.close()
    assert o["hits"] + o["misses"] > 0 and o["misses"] > 0 and o["prefetch"] is True
    assert o["bytes_per_token"] > 0 and o["slots_per_layer"] == 2


def test_max_memory_derives_the_cache_from_the_total(folder, capsys):
    """--max-memory = non-expert weights + full-context KV cache + expert cache: a total with
    room for 2 slots per layer gives 2 slots, and the same tokens as in memory."""
    from moekit.layers.kv_cache import KVCache
    from moekit.offload.budget import kv_bytes, resident_bytes

    model, _, _ = load_for_inference(folder)
    kv = kv_bytes(model.cfg, 1, torch.float32)
    assert kv == KVCache(model.cfg, 1).nbytes  # what generate and chat allocate at most
    total = resident_bytes(model) + kv + 2 * 2 * 49152 + 4 * 64 + 1000
    ref, _ = _generate(folder, capsys)
    rec, err = _generate(folder, capsys, "--max-memory", f"{total / 1e9:.9f}", "--no-prefetch")
    assert rec["output_ids"] == ref["output_ids"] and rec["offload"]["slots_per_layer"] == 2
    assert f"--max-memory {total / 1e9:.9g} leaves" in err
    assert rec["offload"]["cache_allocated_bytes"] <= total - resident_bytes(model) - kv


@pytest.mark.parametrize("extra, message", [
    (["--max-memory", "0.0001"], "--max-memory 0.0001 does not fit the resident part: non-expert weights"),
    (["--max-memory", "1", "--expert-cache-gb", "0.5"], "--expert-cache-gb and --max-memory both size the expert cache"),
])
def test_bad_max_memory_is_one_line_exit_2(folder, capsys, extra, message):
    assert message in usage_error(["generate", str(folder), "--prompt", PROMPT, *extra], capsys)
