"""The command line: numbers out, one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from moekit.cli import main


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True, timeout=120)


def test_inspect_preset_prints_published_numbers(capsys):
    assert main(["inspect", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46.70B" in out and "12.88B" in out and "routed_experts" in out


def test_inspect_json(capsys):
    assert main(["inspect", "olmoe-1b-7b", "--json", "--seq-len", "2048"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seq_len"] == 2048 and 6.9e9 < data["total_params"] < 6.95e9
    assert data["gpus_80gb_for_weights"]["fp32"] == 1


def test_inspect_config_file(tmp_path, capsys):
    from moekit import get_preset

    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny-fine").to_dict()))
    assert main(["inspect", str(tmp_path)]) == 0
    assert "shared_experts" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["inspect", "tiny-mo"], "unknown preset 'tiny-mo'; known presets: tiny-moe"),
        (["inspect", "/no/such/config.json"], "no such file"),
        (["inspect", "tiny-moe", "--seq-len", "0"], "--seq-len"),
        (["inspect"], "inspect needs a target"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle):
    p = run(*args)
    assert p.returncode == 2
    assert needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_invalid_config_file_names_the_field(tmp_path):
    bad = dict(d_model=64, n_heads=5)
    (tmp_path / "c.json").write_text(json.dumps(bad))
    p = run("inspect", str(tmp_path / "c.json"))
    assert p.returncode == 2 and "d_model (64) must be divisible by n_heads (5)" in p.stderr


def test_presets_lists_every_preset(capsys):
    from moekit import preset_names

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in preset_names())


def test_demo_runs(capsys):
    assert main(["demo", "--steps", "2", "--batch-size", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "step 2" in out and "MoE layer 3" in out


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`moekit inspect ... --json | head -1`: a closed pipe ends the command quietly."""
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "inspect", "mixtral-8x7b", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.close()  # the reader is gone before moekit writes a byte
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode in (0, 141)


def test_an_internal_bug_keeps_its_traceback(monkeypatch):
    """Only bad input (UsageError) becomes one line; a ValueError from a bug must not be disguised."""
    import moekit.cli as cli

    def buggy(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "cmd_presets", buggy)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["presets"])


@pytest.mark.parametrize("argv", [["--help"], ["presets"], ["train", "--help"], ["serve", "--help"]])
def test_help_and_presets_start_without_torch(argv):
    """torch alone costs about 1.5 s of start-up: only commands that compute may import it."""
    code = ("import sys\nfrom moekit.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_package_names_still_import_on_demand():
    import moekit
    from moekit.training import TrainConfig

    assert moekit.MoETransformer.__name__ == "MoETransformer" and TrainConfig().lr > 0
    assert "MoETransformer" in dir(moekit)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moekit.nope
