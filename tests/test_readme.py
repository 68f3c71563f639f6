"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_readme_shell_commands_parse(capsys):
    """Every `moekit ...` line of the README's shell blocks (also after torchrun) names flags and
    values the CLI accepts: a renamed or removed flag breaks this, not a reader's first try."""
    import shlex

    from moekit.cli import build_parser

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            m = re.match(r"^\s*(?:[A-Z_]+=\S+\s+)*(?:torchrun\s.*?-m\s+)?moekit\s(.*)$", line)
            if m:
                argv = shlex.split(m.group(1), comments=True)
                commands.append(argv[:argv.index("|")] if "|" in argv else argv)
    assert len(commands) >= 40, f"found only {len(commands)} moekit commands: has the README's format changed?"
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README: moekit {shlex.join(argv)}: {capsys.readouterr().err.strip()}") from None
