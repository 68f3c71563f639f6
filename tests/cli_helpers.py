"""The one check every bad-input CLI test makes: exit 2 with one line on stderr, no traceback."""

from __future__ import annotations

from moekit.cli import main


def usage_error(argv: list[str], capsys) -> str:
    """Run ``moekit ARGV`` in this process; assert it refused with exit 2 and a single line of
    stderr without a traceback, and return that line (argparse's own errors exit through
    SystemExit, moekit's through the return code)."""
    capsys.readouterr()  # drop what came before (progress bars of a fixture)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def assert_usage_error(argv: list[str], capsys, match: str) -> None:
    err = usage_error(argv, capsys)
    assert match in err, err
