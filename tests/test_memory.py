"""The memory check before a model is built: the counted bytes against the memory available."""

import json
import os
import subprocess
import sys

import pytest

from moekit import memory
from moekit.accounting import count_params
from moekit.cli import main
from moekit.config import ModelConfig
from moekit.presets import get_preset


def moekit_cli(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "moekit", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def test_demo_of_a_preset_too_large_is_refused_in_one_line():
    proc = moekit_cli("demo", "--preset", "mixtral-8x7b")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "mixtral-8x7b needs at least 747.2 GB (fp32 weights, gradients and AdamW moments) but only" in err
    assert "of RAM is available; the largest preset that fits is" in err and "--force" in err


def test_eval_of_a_run_config_with_a_billion_experts_is_refused_before_allocating(tmp_path, capsys):
    cfg = get_preset("tiny-moe").to_dict()
    cfg["moe"]["num_experts"] = 10**9
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "train_config.json").write_text(json.dumps({"data": {"tokenizer": "bytes"}}))
    (run / "tokenizer.json").write_text(json.dumps({"moekit_tokenizer": "bytes", "version": 1}))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"the model of {run} needs at least" in err and "fp32 weights" in err and "is available" in err
    need = count_params(ModelConfig.from_dict(cfg)).total * 4
    assert f"{need / 1e9:,.1f} GB" in err


def test_required_bytes_follow_the_parameter_count():
    cfg = get_preset("tiny-moe")
    n = count_params(cfg).total
    assert memory.required_bytes(cfg) == 4 * n
    assert memory.required_bytes(cfg, "bf16") == 2 * n
    assert memory.required_bytes(cfg, training=True) == 16 * n


def test_meminfo_is_read_from_the_kernel_file(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24684084 kB\nMemFree:         1000 kB\nMemAvailable:   22940048 kB\n")
    assert memory._meminfo_available(str(f)) == 22940048 * 1024
    f.write_text("MemTotal: 1 kB\n")  # an old kernel without MemAvailable
    assert memory._meminfo_available(str(f)) is None
    real = memory.cpu_available_bytes()
    assert real is None or real > 0


def test_what_fits_suggests_bf16_then_a_smaller_preset():
    cfg = get_preset("tiny-moe")
    fp32 = memory.required_bytes(cfg)
    assert memory.what_fits(cfg, int(fp32 * 0.6), "fp32", training=False) == "in bf16 it would fit"
    hint = memory.what_fits(get_preset("mixtral-8x7b"), int(1e9), "fp32", training=True)
    assert hint.startswith("the largest preset that fits is tiny-")
    assert memory.what_fits(cfg, 10, "fp32", training=True).startswith("no preset fits")


def test_force_skips_the_check_and_from_pretrained_checks(tmp_path, monkeypatch):
    from hf_tiny import build

    import moekit

    folder = tmp_path / "mixtral"
    build("mixtral").save_pretrained(folder)
    monkeypatch.setattr(memory, "cpu_available_bytes", lambda: 1000)  # a machine with 1 kB free
    with pytest.raises(memory.InsufficientMemoryError, match=r"needs at least .* but only 0 MB of RAM"):
        moekit.from_pretrained(folder)
    assert moekit.from_pretrained(folder, check_memory=False) is not None
    memory.check_fits(get_preset("deepseek-v3"), force=True)


def test_threads_are_set_and_shown_and_a_bad_count_is_one_line(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["demo", "--steps", "1", "--batch-size", "1", "--seq-len", "8", "--threads", "1"]) == 0
        assert "1 CPU thread(s)" in capsys.readouterr().out and torch.get_num_threads() == 1
        assert main(["demo", "--threads", "0"]) == 2
        assert capsys.readouterr().err.strip() == "moekit demo: error: --threads must be >= 1, got 0"
    finally:
        torch.set_num_threads(before)


def test_a_demo_batch_too_large_for_memory_is_one_line():
    proc = moekit_cli("demo", "--steps", "1", "--batch-size", str(10**12), "--seq-len", "8", "--threads", "1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("moekit demo: error: out of memory with a batch of 1000000000000 x 8 tokens: "
                                   "lower --batch-size or --seq-len")
