"""Where text comes from: local files, folders and globs, or the built-in default corpus.

The default corpus needs no download: the source files of the running Python's standard
library (real code with real English docstrings and comments, about 30 MB).

A *document* is the unit of the train/validation split: one text file, one jsonl line or one
parquet row. Files longer than ``PART_CHARS`` are cut at line ends into parts that are split
separately, so that a corpus of one big text file still yields a validation set.

Bad input raises ``UsageError`` with one line naming the file: a missing path, a pattern that
matches nothing, a jsonl line that is not JSON or lacks the text field. A file that is not
UTF-8 is skipped and counted (``Corpus.skipped``), never silently.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from moekit.errors import UsageError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
PART_CHARS = 1 << 16  # 64K characters: the largest document the split sees
_SKIP_DIRS = {"site-packages", "__pycache__", "dist-packages"}


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # stable name for the split: relative to the folder given (or the file's name)


@dataclass(frozen=True)
class Document:
    name: str  # hashed (with a seed) to choose the split; stable across machines
    text: str


def default_corpus_root() -> Path:
    """The running Python's standard library folder (its .py files are the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, suffixes: tuple[str, ...]) -> list[SourceFile]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted in place so the walk order (and so every name) is the same on every machine.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(suffixes) and not fn.startswith("."):
                path = Path(dirpath) / fn
                found.append(SourceFile(path, path.relative_to(root).as_posix()))
    return found


def resolve_sources(specs: Sequence[str]) -> list[SourceFile]:
    """Files, folders (searched recursively for DATA_SUFFIXES) and globs -> a sorted file list.

    No specs means the default corpus: every .py file of the standard library.
    """
    if not specs:
        return _walk(default_corpus_root(), (".py",))
    files: dict[Path, SourceFile] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            found = [SourceFile(path, path.name)]
        elif path.is_dir():
            found = _walk(path, DATA_SUFFIXES)
            if not found:
                raise UsageError(f"no text files in folder {spec} (looked for {', '.join(DATA_SUFFIXES)})")
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
            found = [SourceFile(p, p.as_posix()) for p in matches if p.is_file()]
            if not found:
                raise UsageError(f"no files match {spec}")
        else:
            raise UsageError(f"no such file or folder: {spec}")
        for f in found:
            files.setdefault(f.path.resolve(), f)
    return sorted(files.values(), key=lambda f: (f.name, str(f.path)))


def fingerprint(files: Sequence[SourceFile]) -> str:
    """A hash of the file list with sizes and modification times (cheap; no content read)."""
    h = hashlib.sha256()
    for f in files:
        st = f.path.stat()
        h.update(f"{f.name}\0{f.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def split_parts(text: str, limit: int = PART_CHARS) -> list[str]:
    """Cut text into pieces of at most ``limit`` characters, at line ends where possible."""
    parts, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind("\n", start, start + limit)
        cut = start + limit if cut <= start else cut + 1
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


class Corpus:
    """The documents of a list of sources. Iterating twice yields the same documents."""

    def __init__(self, specs: Sequence[str] = (), text_field: str = "text"):
        self.specs = list(specs)
        self.text_field = text_field
        self.files = resolve_sources(self.specs)
        self.skipped: list[Path] = []  # files that are not UTF-8, found by the last iteration

    @property
    def description(self) -> str:
        return ", ".join(self.specs) if self.specs else f"the Python standard library ({default_corpus_root()})"

    def fingerprint(self) -> str:
        return fingerprint(self.files)

    def documents(self) -> Iterator[Document]:
        self.skipped = []
        for f in self.files:
            suffix = f.path.suffix.lower()
            if suffix == ".jsonl":
                yield from self._jsonl(f)
            elif suffix == ".parquet":
                yield from self._parquet(f)
            else:
                text = self._read_text(f.path)
                if text is not None:
                    yield from _as_parts(f.name, text)

    def _read_text(self, path: Path) -> str | None:
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            self.skipped.append(path)
            return None
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from e

    def _jsonl(self, f: SourceFile) -> Iterator[Document]:
        text = self._read_text(f.path)
        if text is None:
            return
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{f.path} line {lineno}: not valid JSON ({e.msg})") from None
            value = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                what = "has no" if value is None else "has a non-string"
                raise UsageError(f"{f.path} line {lineno} {what} {self.text_field!r} field (set it with --text-field)")
            yield from _as_parts(f"{f.name}:{lineno}", value)

    def _parquet(self, f: SourceFile) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError(f"reading {f.path} needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(f.path)
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise UsageError(f"cannot read parquet file {f.path}: {e}") from None
        if self.text_field not in table.column_names:
            raise UsageError(f"{f.path} has no {self.text_field!r} column (columns: {', '.join(table.column_names)})")
        for row, value in enumerate(table.column(self.text_field).to_pylist()):
            if isinstance(value, str):
                yield from _as_parts(f"{f.name}:{row}", value)


def _as_parts(name: str, text: str) -> Iterator[Document]:
    if not text.strip():
        return
    parts = split_parts(text)
    if len(parts) == 1:
        yield Document(name, text)
    else:
        for i, part in enumerate(parts):
            yield Document(f"{name}#{i}", part)


__all__ = ["Corpus", "Document", "SourceFile", "resolve_sources", "fingerprint", "default_corpus_root", "split_parts"]
