"""The one-line promise, for every subcommand and flag: bad input exits 2 with one line and no
traceback. The cases are generated from the argparse parsers themselves, so a new subcommand
or flag is covered (or fails the guard below) without editing this file.

Numbers are refused while parsing (moekit.argtypes); a missing file, a bad choice or a bad
``--set`` is refused before any real work starts.
"""

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pytest

from moekit import MoEConfig, ModelConfig
from moekit.argtypes import FloatArg, IntArg
from moekit.cli import build_parser, main

MISSING = "/no/such/moekit-path.json"
PATH_METAVARS = ("PATH", "FILE", "DIR")  # metavar endings of arguments that name a file or folder
# Free-form options that also take a file (a preset name or a config JSON, bpe/bytes or a tokenizer.json).
ALSO_PATHS = {"--preset", "--tokenizer", "target"}
BAD_SETS = ["no-equals-sign", "no_such_field=1", "lr=nan", "moe=5", "max_steps=-3", "data.sources=5"]


def leaf_parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for every runnable subcommand, nested ones (bench layer) included."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_parsers(sub, prefix + (name,))


def _arguments(parser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _filler(action, run_dir: str) -> str:
    """A valid value for a required positional."""
    if action.choices:
        return list(action.choices)[0]
    return run_dir if action.metavar == "RUN_DIR" else "tiny-moe"


def invalid_values(action) -> list[str]:
    t = action.type
    if isinstance(t, IntArg):
        above = [str(t.maximum + 1)] if t.maximum is not None else []
        return [str(t.minimum - 1), str(t.minimum - 1000), "abc", "nan", "1.5", "", *above]
    if isinstance(t, FloatArg):
        below = str(t.minimum) if t.strict else str(t.minimum - 1)
        above = [str(t.maximum * 2 + 1)] if t.maximum is not None else []
        return ["nan", "inf", "-inf", "abc", below, *above]
    if action.choices and action.option_strings:
        return ["no-such-choice"]
    if str(action.metavar).endswith(PATH_METAVARS) or action.dest in ALSO_PATHS or set(action.option_strings) & ALSO_PATHS:
        return [MISSING]
    if action.metavar == "KEY=VALUE":
        return BAD_SETS
    return []


def cases(run_dir: str = "RUN"):
    """(id, argv) for every invalid value of every argument of every subcommand."""
    for words, parser in leaf_parsers(build_parser()):
        args = _arguments(parser)
        positionals = [a for a in args if not a.option_strings]
        for action in args:
            for value in invalid_values(action):
                fill = [value if p is action else _filler(p, run_dir) for p in positionals]
                flag = [] if not action.option_strings else [action.option_strings[-1], value]
                yield f"{' '.join(words)} {action.dest}={value!r}", [*words, *fill, *flag]


def test_every_numeric_argument_is_validated_while_parsing():
    """The guard: a plain type=int/float would let 0, -1 or nan through to torch or numpy."""
    plain = [(" ".join(w), a.dest) for w, p in leaf_parsers(build_parser()) for a in _arguments(p)
             if a.type in (int, float)]
    assert plain == [], f"use moekit.argtypes for {plain}"


def test_every_argument_has_help_text():
    missing = [(" ".join(w), a.dest) for w, p in leaf_parsers(build_parser()) for a in _arguments(p) if not a.help]
    assert missing == []


def test_the_generated_cases_cover_every_subcommand():
    covered = {argv[0] if argv[0] not in ("bench", "lora") else " ".join(argv[:2]) for _, argv in cases()}
    commands = {" ".join(w) for w, _ in leaf_parsers(build_parser())}
    assert commands - {"presets"} <= covered  # presets takes no arguments
    assert len(list(cases())) > 150


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real, tiny run folder, so that flags after RUN_DIR are checked, not the folder."""
    from rich.console import Console

    from moekit.training import TrainConfig, train

    root = tmp_path_factory.mktemp("badinput")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (root / "corpus" / "b.txt").write_text("class A:\n    pass\n" * 40)
    model = ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32,
                        moe=MoEConfig(d_model=16, d_expert=16, num_experts=2, top_k=1))
    cfg = TrainConfig.from_dict(dict(data=dict(sources=[str(root / "corpus")], tokenizer="bytes", val_fraction=0.5),
                                     seq_len=16, batch_size=2, max_steps=1, eval_every=1, eval_batches=1,
                                     device="cpu", cache_dir=str(root / "cache")))
    train(cfg, model, root / "run", console=Console(file=io.StringIO()))
    return str(root / "run")


@pytest.fixture
def sandbox(tmp_path, monkeypatch, run_dir):
    """Whatever a refused command might still create lands here, and not in the repository; the
    cache root is the run's own (no note that the run's cache_dir is ignored)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOEKIT_CACHE", str(Path(run_dir).parent / "cache"))
    return tmp_path


def test_every_invalid_value_is_one_line_and_exit_2(run_dir, sandbox, capsys):
    failures = []
    for case_id, argv in cases(run_dir):
        code = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()  # progress lines may come first; the error is one line, last
        errors = [line for line in lines if "error:" in line]
        if code != 2 or "Traceback" in captured.err or len(errors) != 1 or not lines[-1].startswith("moekit "):
            failures.append(f"{case_id}: exit {code}, stderr {captured.err[-300:]!r}")
    assert failures == [], "\n".join(failures)


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--steps", "-1"], "--steps must be >= 1, got -1"),
    (["demo", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["demo", "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["sample", "RUN", "--temperature", "nan"], "--temperature must be a finite number, got 'nan'"),
    (["eval", "RUN", "--batches", "0"], "--batches must be >= 1, got 0"),
    (["eval", "RUN", "--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    (["train", "--set", "moe=5"], "moe must be a mapping of MoEConfig fields or null, got 5"),
])
def test_reported_cases_in_a_real_process(argv, needle, sandbox):
    out = subprocess.run([sys.executable, "-m", "moekit", *argv], capture_output=True, text=True, timeout=120)
    err = out.stderr.strip()
    assert out.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err
