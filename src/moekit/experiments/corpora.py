"""Built-in corpora an experiment can train a variant on instead of ``--data``, written on
demand from what every CPython install holds, so a run needs no download and reproduces.

``python-reference``: the Python Language Reference as ``help()`` shows it (the stdlib's
``pydoc_data.topics``), one text file per topic: about 465k characters of English prose with
short code examples, for a model pre-trained on the default corpus (stdlib source code) a
different distribution to fine-tune on. ``pydoc_data/topics.py`` is itself one of the
default corpus's ~1,900 files, so a pre-training run may have seen a few windows of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from moekit.fileio import atomic_write_text


def python_reference(folder: Path) -> None:
    from pydoc_data.topics import topics

    for name, text in sorted(topics.items()):
        path = folder / f"{name}.txt"
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)


CORPORA: dict[str, Callable[[Path], None]] = {"python-reference": python_reference}


def corpus_folder(name: str, root: Path) -> Path:
    """``root/name``, written (or refreshed) with the corpus's files -> the folder."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    CORPORA[name](folder)
    return folder


__all__ = ["CORPORA", "corpus_folder", "python_reference"]
