"""`moekit bench layer`: runs end to end on a tiny setting, writes its JSON, rejects bad flags."""

import json

import torch

from moekit.bench.layer import SHAPES, useful_flops
from moekit.cli import main


def test_bench_layer_decode_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "layer", "--quick", "--shapes", "coarse", "--modes", "decode1", "--no-hf",
                 "--loop", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "moekit[loop]" in table and "dense" in table
    rows = json.loads(out.read_text())["rows"]
    assert {r["name"] for r in rows} == {"moekit", "moekit[loop]", "dense"}
    for r in rows:
        assert r["tokens"] == 1 and len(r["times_ms"]) == 5 and r["ms"] > 0
    dense = next(r for r in rows if r["name"] == "dense")
    assert dense["vs_dense"] == 1.0


def test_flops_count_active_width():
    s = SHAPES["fine+shared"]  # 6 routed + 2 shared experts of width 256
    assert useful_flops(s, 10, "fwd") == 6 * 512 * 8 * 256 * 10
    assert useful_flops(s, 10, "fwd+bwd") == 3 * useful_flops(s, 10, "fwd")


def test_bench_layer_bad_flags_exit_2(capsys):
    assert main(["bench", "layer", "--shapes", "huge"]) == 2
    err = capsys.readouterr().err
    assert "--shapes" in err and "coarse" in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "layer", "--repeats", "2"]) == 2


def test_table_columns_stay_aligned_when_values_are_missing():
    from moekit.bench.layer import Row, format_table

    full = Row("coarse", "fp32", "decode1", 1, "moekit", ms=3.5, tokens_per_s=287.0, gflops=3.2,
               vs_dense=1.28, vs_hf_best=0.9, saved_mb=0.0, peak_mb=0.1)
    no_hf = Row("coarse", "fp32", "decode1", 1, "moekit", ms=3.5, tokens_per_s=287.0, gflops=3.2,
                vs_dense=1.28, vs_hf_best=None, saved_mb=0.0, peak_mb=0.1)
    _, _, a, b = format_table([full, no_hf]).splitlines()
    assert len(a) == len(b)  # the "-" takes the missing number's width
    assert a.split()[-3:] == ["0.90", "0.1", "0.0"] and b.split()[-3:] == ["-", "0.1", "0.0"]


def test_peak_bytes_counts_temporaries_but_not_parameter_gradients():
    from torch import nn

    from moekit.bench.layer import peak_bytes

    mlp = nn.Sequential(nn.Linear(256, 8192, bias=False), nn.ReLU(), nn.Linear(8192, 256, bias=False))
    x, dy = torch.randn(64, 256), torch.randn(64, 256)
    hidden = 64 * 8192 * 4  # one [64, 8192] fp32 activation: 2 MiB
    assert hidden <= peak_bytes(mlp, x, None) < 3 * hidden  # the ReLU may not run in place
    train = peak_bytes(mlp, x, dy)
    # Backward keeps the hidden activations and their gradient; the two 8 MiB weight
    # gradients are not counted, and the measurement leaves no gradient behind.
    assert 2 * hidden <= train < 2 * 2**23
    assert all(p.grad is None for p in mlp.parameters())


def test_bench_layer_writes_a_file_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "layer", "--quick", "--shapes", "coarse", "--modes", "decode1", "--no-hf", "--threads", "1"]
    assert main(argv) == 0
    assert list(tmp_path.iterdir()) == [] and "wrote" not in capsys.readouterr().out
    assert main([*argv, "--json", "sub/b.json"]) == 0
    assert json.loads((tmp_path / "sub" / "b.json").read_text())["rows"]
