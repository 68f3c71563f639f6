"""``moekit inspect --ep/--gpus``: the split arithmetic against the parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moekit.accounting import count_params
from moekit.cli import main
from moekit.distributed.arithmetic import (
    a2a_bytes_per_token_per_layer, gpus_needed, parallel_summary, parallel_table, per_gpu_params,
)
from moekit.presets import get_preset


# Mixtral's 8 experts allow --ep 8 at most.
SPLITS = [("mixtral-8x7b", 8)] + [(name, ep) for name in ("qwen3-30b-a3b", "deepseek-v3") for ep in (8, 16, 64)]


@pytest.mark.parametrize("name, ep", SPLITS)
def test_shards_add_up_to_the_model(name, ep):
    cfg = get_preset(name)
    pc = count_params(cfg)
    gpus = 2 * ep
    # FSDP: every parameter on exactly one GPU; DDP: the experts split ep ways, the rest everywhere.
    assert per_gpu_params(cfg, ep, gpus, fsdp=True) * gpus == pytest.approx(pc.total)
    experts = pc.breakdown["routed_experts"]
    assert per_gpu_params(cfg, ep, gpus, fsdp=False) == pytest.approx(experts / ep + pc.total - experts)
    s = parallel_summary(cfg, ep, gpus, seq_len=1024, batch_size=gpus)
    assert s["a2a_bytes_per_gpu_per_step_fwd"] == 1024 * len(cfg.moe_layer_ids) * 2 * cfg.moe.top_k * cfg.d_model * 2


def test_gpus_needed_is_the_smallest_fitting_multiple_of_ep():
    cfg = get_preset("mixtral-8x7b")
    n = gpus_needed(cfg, 8, 16, fsdp=True)
    assert n % 8 == 0
    assert per_gpu_params(cfg, 8, n, True) * 16 <= 80e9 < per_gpu_params(cfg, 8, n - 8, True) * 16


def test_a2a_bytes_formula():
    cfg = get_preset("qwen3-30b-a3b")  # top-8, d_model 2048: 8 rows out and 8 back, bf16
    assert a2a_bytes_per_token_per_layer(cfg) == 2 * 8 * 2048 * 2


def test_inspect_json_has_the_split(capsys):
    assert main(["inspect", "deepseek-v3", "--ep", "64", "--gpus", "128", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["parallel"]
    assert s["dp"] == 2 and s["ep"] == 64


@pytest.mark.parametrize("args, message", [
    (["tiny-moe", "--ep", "3"], "--ep 3 does not divide the number of experts 8"),
    (["tiny-moe", "--ep", "4", "--gpus", "6"], "--ep 4 does not divide --gpus 6"),
    (["tiny-dense", "--ep", "2"], "needs an MoE model"),
    (["tiny-moe", "--batch-size", "4"], "--batch-size needs --ep or --gpus"),
])
def test_bad_split_is_one_line_exit_2(capsys, args, message):
    assert main(["inspect", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("ep, dp, world, experts, message", [
    (3, None, 4, 8, "--ep 3 does not divide the world size 4"),
    (4, None, 4, 6, "--ep 4 does not divide the number of experts 6"),
    (2, 3, 4, 8, "--dp 3 times --ep 2 must equal the world size 4"),
    (2, None, 2, None, "--ep 2 needs an MoE model"),
])
def test_bad_layouts_name_the_flag(ep, dp, world, experts, message):
    from moekit.distributed.mesh import ParallelConfig, check_layout
    from moekit.errors import UsageError

    with pytest.raises(UsageError, match=message.replace("-", r"\-")):
        check_layout(ParallelConfig(ep=ep, dp=dp), world, experts)


def test_layout_gives_the_replicas():
    from moekit.distributed.mesh import ParallelConfig, check_layout

    assert check_layout(ParallelConfig(ep=2), 8, 16) == 4
    assert check_layout(ParallelConfig(), 3, None) == 3  # plain data parallelism of a dense model


def test_doc_table_is_the_generated_one():
    doc = (Path(__file__).parent.parent / "docs" / "distributed.md").read_text()
    assert parallel_table() in doc, "regenerate the table in docs/distributed.md: python -m moekit.distributed.arithmetic"


def test_doc_table_rows_are_the_summary():
    """The generated table is the arithmetic's own figures (not a second derivation)."""
    s = parallel_summary(get_preset("qwen3-30b-a3b"), 16, 16, 4096)
    row = next(line for line in parallel_table().splitlines() if line.startswith("| Qwen3-30B-A3B | 16 |"))
    assert s["a2a_bytes_per_token_per_layer_fwd"] == 2 * 8 * 2048 * 2 and "| 65.54KB |" in row
    assert s["a2a_bytes_per_gpu_per_step_fwd"] == 4096 * 48 * 65536 and "| 12.88GB / 25.77GB |" in row
    assert "| 16 / 16 / 16 |" in row


def test_backend_follows_the_device():
    from moekit.distributed.mesh import backend_for

    assert backend_for("cuda") == "nccl" and backend_for("cpu") == "gloo"
