"""moekit train / eval / sample: configs and overrides, one-line errors, Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moekit import MoEConfig, ModelConfig
from moekit.cli import build_parser, main
from moekit.data import default_corpus_root
from moekit.training import read_metrics
from moekit.training.checkpoint import list_checkpoints, verify_checkpoint
from moekit.training.cli import build_configs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in ("textwrap.py", "string.py", "colorsys.py", "bisect.py", "heapq.py", "fnmatch.py"):
        shutil.copy(default_corpus_root() / name, corpus / name)
    model = ModelConfig(vocab_size=8192, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64,
                        moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2))
    (root / "model.json").write_text(json.dumps(model.to_dict()))
    bad = root / "bad"
    bad.mkdir()
    (bad / "short.txt").write_text("def f(): pass\n")  # 15 tokens: less than one sequence
    (bad / "blank.md").write_text("  \n\n")
    (bad / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def common(files, out) -> list[str]:
    return ["--preset", str(files / "model.json"), "--data", str(files / "corpus"), "--tokenizer", "bytes",
            "--seq-len", "32", "--batch-size", "4", "--cache-dir", str(files / "cache"), "--out", str(out)]


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_train_then_eval_then_sample(files, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *common(files, run), "--max-steps", "6", "--eval-every", "3", "--lr", "1e-2"]) == 0
    out = capsys.readouterr().out
    assert "final validation loss" in out and "step 0" in out and str(run) in out
    final = read_metrics(run, "end")[-1]["val_loss"]

    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 6 and report["val_loss"] == pytest.approx(final, abs=1e-6)
    assert len(report["routing"]) == 2 and report["tokens"] == 8 * 4 * 32

    assert main(["eval", str(run), "--data", str(files / "corpus" / "heapq.py"), "--batches", "1"]) == 0
    assert "validation loss" in capsys.readouterr().out

    assert main(["sample", str(run), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_config_precedence_file_then_flags_then_set(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("preset: tiny-switch\nlr: 0.5\nbatch_size: 3\nmodel:\n  n_layers: 2\n  moe:\n    top_k: 1\n"
                        "data:\n  val_fraction: 0.2\n")
    label, train_cfg, model_cfg = build_configs(parse("--config", str(cfg_file), "--lr", "0.25",
                                                      "--set", "moe.capacity_factor=2.0", "--set", "seed=7",
                                                      "--set", "data.vocab_size=4096", "--set", "model.d_ff=96"))
    assert label == "tiny-switch"
    assert train_cfg.lr == 0.25 and train_cfg.batch_size == 3 and train_cfg.seed == 7
    assert train_cfg.data.val_fraction == 0.2 and train_cfg.data.vocab_size == 4096
    assert model_cfg.n_layers == 2 and model_cfg.d_ff == 96
    assert model_cfg.moe.top_k == 1 and model_cfg.moe.capacity_factor == 2.0 and model_cfg.moe.num_experts == 8
    _, train_cfg, _ = build_configs(parse("--lr", "0.3", "--set", "lr=1e-3"))
    assert train_cfg.lr == 1e-3


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--data", "/no/such/corpus"], "no such file or folder: /no/such/corpus"),
        (["--set", "nope=1"], "--set nope: no such training or model field"),
        (["--set", "moe.top_k=9"], "top_k (9) must be <= num_experts (4)"),
        (["--set", "vocab_size=100"], "the model's vocab_size follows the tokenizer"),
        (["--lr", "-1"], "lr must be > 0.0"),
        (["--seq-len", "128"], "exceeds the model's max_seq_len 64"),
        (["--config", "/no/such.yaml"], "cannot read config file"),
        (["--data", "{bad}/short.txt"], "the corpus is too short: the training split has 15 tokens"),
        (["--data", "{bad}/blank.md"], "the corpus is empty"),
        (["--data", "{bad}/latin1.txt", "{bad}/blank.md"], "the corpus is empty: no text in {bad}/latin1.txt, "
         "{bad}/blank.md; 1 file(s) skipped as not UTF-8"),
    ],
)
def test_bad_train_input_is_one_line_exit_2(files, tmp_path, capsys, argv, needle):
    base = common(files, tmp_path / "r")
    if "--data" in argv:  # --data extends: drop the good corpus so only the bad input is read
        i = base.index("--data")
        del base[i : i + 2]
    argv, needle = [a.replace("{bad}", str(files / "bad")) for a in argv], needle.replace("{bad}", str(files / "bad"))
    assert main(["train", *base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_jsonl_without_the_field_exits_2_and_leaves_no_cache(files, tmp_path, capsys):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    argv = common(files, tmp_path / "r")
    argv[argv.index("--cache-dir") + 1] = str(tmp_path / "cache")
    argv[argv.index("--data") + 1] = str(bad)
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("d.jsonl line 2 has no 'text' field (set it with --text-field)") and "\n" not in err
    assert not (tmp_path / "cache" / "data").exists() or not any((tmp_path / "cache" / "data").iterdir())


def test_eval_and_resume_errors(files, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", *common(files, run), "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--lr", "1"]) == 2
    assert "cannot change lr when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--set", "moe.top_k=1"]) == 2
    assert "cannot change the model" in capsys.readouterr().err
    assert main(["train", *common(files, run), "--max-steps", "2"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", *common(files, run), "--max-steps", "1", "--overwrite"]) == 0
    assert [c.step for c in list_checkpoints(run)] == [1]
    assert main(["eval", str(run), "--checkpoint", "5"]) == 2
    assert "no checkpoint for step 5" in capsys.readouterr().err


def test_ctrl_c_writes_a_checkpoint_and_the_run_resumes(files, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "moekit", "train", *common(files, run), "--max-steps", "100000",
           "--eval-every", "100000", "--ckpt-every", "100000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 90
    while not read_metrics_safe(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"resume with: moekit train --resume {run}" in out
    (ckpt,) = list_checkpoints(run)
    assert verify_checkpoint(ckpt.path)["step"] == ckpt.step >= 1
    assert read_metrics(run, "end")[-1]["status"] == "interrupted"
    assert main(["train", "--resume", str(run), "--max-steps", str(ckpt.step + 2)]) == 0
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, ckpt.step + 3))


def read_metrics_safe(run):
    try:
        return read_metrics(run, "train")
    except (ValueError, OSError):  # a line being written
        return []
