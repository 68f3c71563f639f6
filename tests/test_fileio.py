"""One atomic-write helper (moekit.fileio): nothing else renames temporary files into place."""

import re
from pathlib import Path

import moekit

SRC = Path(moekit.__file__).parent


def test_only_fileio_writes_files_by_temp_and_rename():
    # os.rename of a finished folder (the data cache, checkpoints) is a different recipe and allowed
    pattern = re.compile(r"tempfile\.mkstemp|os\.replace\(")
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if p.name != "fileio.py" and pattern.search(p.read_text())]
    assert offenders == [], f"use moekit.fileio.atomic_path / atomic_write_* in {offenders}"
