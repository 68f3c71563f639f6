"""Token categories derived from the text itself, for asking what experts specialize in.

Every character of a document gets a category, then every token takes the category most of
its characters have (ties go to the category listed first). Tokens find their characters
through the tokenizer's offsets: ``tokenizers`` encodings carry character offsets, and the
bytes tokenizer maps each byte to the character it belongs to.

Built-in categories (the default corpus is Python with English in it):

    whitespace   spaces, newlines, indentation          keyword      Python keywords
    punctuation  operators, brackets, other symbols     identifier   names in code
    number       numeric literals, digits               string       string literals, docstrings
    comment      comments (prose in code)               prose        words of non-code text
    other        end-of-text, and characters no rule claims

Python source is labelled with the standard ``tokenize`` module; when it fails (text that is
not valid Python) a regular-expression lexer of Python-like code takes over; a document that
does not tokenize as Python and does not end in .py is treated as prose. Users may give their
own categories instead: a file of ``name<TAB>regex`` or ``name=regex`` lines (first listed wins).
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekit.errors import UsageError

BUILTIN = ("whitespace", "punctuation", "number", "keyword", "identifier", "string", "comment", "prose", "other")
_ID = {name: i for i, name in enumerate(BUILTIN)}
OTHER = "other"

_CODE_RE = re.compile(
    r"""(?P<comment>\#[^\n]*)
    |(?P<string>[rRbBuUfF]{0,2}(?:\"\"\"[\s\S]*?(?:\"\"\"|\Z)|'''[\s\S]*?(?:'''|\Z)|"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?))
    |(?P<number>\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?[jJ]?)
    |(?P<word>[^\W\d]\w*)
    |(?P<whitespace>\s+)
    |(?P<punctuation>[^\w\s])""",
    re.VERBOSE,
)
_PROSE_RE = re.compile(r"(?P<whitespace>\s+)|(?P<number>\d+)|(?P<prose>[^\W\d_]+|\w+)|(?P<punctuation>[^\w\s])")
_PROSE_SUFFIXES = (".md", ".txt", ".rst")


@dataclass(frozen=True)
class CategoryScheme:
    """The category names and how to label a document's characters with their indices."""

    names: tuple[str, ...]
    user_rules: tuple[tuple[str, re.Pattern], ...] = ()  # empty: the built-in code/prose labels

    @property
    def other(self) -> int:
        return self.names.index(OTHER)

    @property
    def whitespace(self) -> int | None:
        return self.names.index("whitespace") if "whitespace" in self.names else None

    def label(self, text: str, doc_name: str = "") -> np.ndarray:
        """[len(text)] int8 category index of every character."""
        if self.user_rules:
            return label_user(text, self.user_rules, self.names)
        return label_builtin(text, doc_name)


def builtin_scheme() -> CategoryScheme:
    return CategoryScheme(BUILTIN)


def _fill(labels: np.ndarray, start: int, end: int, name: str) -> None:
    labels[start:end] = _ID[name]


def _default_labels(text: str) -> np.ndarray:
    return np.array([_ID["whitespace"] if c.isspace() else _ID[OTHER] for c in text], dtype=np.int8)


def label_python(text: str) -> np.ndarray | None:
    """Label ``text`` with Python's tokenizer; None when it is not valid Python to tokenize."""
    labels = _default_labels(text)
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            name = _python_category(tok)
            if name is None:
                continue
            start = line_starts[tok.start[0] - 1] + tok.start[1] if tok.start[0] <= len(line_starts) else len(text)
            end = line_starts[tok.end[0] - 1] + tok.end[1] if tok.end[0] <= len(line_starts) else len(text)
            _fill(labels, start, end, name)
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        return None
    return labels


def _python_category(tok: tokenize.TokenInfo) -> str | None:
    kind = tokenize.tok_name[tok.type]
    if kind == "COMMENT":
        return "comment"
    if "STRING" in kind:  # STRING, and FSTRING_START/MIDDLE/END from Python 3.12
        return "string"
    if kind == "NUMBER":
        return "number"
    if kind == "NAME":
        return "keyword" if keyword.iskeyword(tok.string) else "identifier"
    if kind == "OP":
        return "punctuation"
    if kind in ("NEWLINE", "NL", "INDENT"):
        return "whitespace"
    return None  # DEDENT, ENDMARKER (empty), ERRORTOKEN: keep the per-character default


def label_regex(text: str, prose: bool = False) -> np.ndarray:
    """The fallback lexer: Python-like code (comments, strings, numbers, words) or prose."""
    labels = _default_labels(text)
    for m in (_PROSE_RE if prose else _CODE_RE).finditer(text):
        name = m.lastgroup
        if name == "word":
            name = "keyword" if keyword.iskeyword(m.group()) else "identifier"
        _fill(labels, m.start(), m.end(), name)
    return labels


def label_builtin(text: str, doc_name: str = "") -> np.ndarray:
    if doc_name.lower().endswith(_PROSE_SUFFIXES):
        return label_regex(text, prose=True)
    labels = label_python(text)
    if labels is not None:
        return labels
    return label_regex(text, prose=not doc_name.lower().endswith((".py", ".pyi", ".pyw")))


def label_user(text: str, rules, names: tuple[str, ...]) -> np.ndarray:
    """Each character takes the first rule whose regex match covers it; the rest are ``other``."""
    unset = -1
    labels = np.full(len(text), unset, dtype=np.int8)
    for name, pattern in rules:
        idx = names.index(name)
        for m in pattern.finditer(text):
            if m.end() > m.start():
                span = labels[m.start():m.end()]
                span[span == unset] = idx
    labels[labels == unset] = names.index(OTHER)
    return labels


def load_user_categories(path: str | Path) -> CategoryScheme:
    """A file of ``name<TAB>regex`` or ``name=regex`` lines (blank lines and ``#`` lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read categories file {path}: {getattr(e, 'strerror', None) or e}") from None
    rules: list[tuple[str, re.Pattern]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        sep = "\t" if "\t" in line else "="
        name, found, regex = line.partition(sep)
        name = name.strip()
        if not found or not name or not regex:
            raise UsageError(f"{path}:{n}: expected 'name<TAB>regex' or 'name=regex', got {line!r}")
        if name == OTHER or name in (r[0] for r in rules):
            raise UsageError(f"{path}:{n}: category name {name!r} is reserved or repeated")
        try:
            rules.append((name, re.compile(regex)))
        except re.error as e:
            raise UsageError(f"{path}:{n}: bad regex for {name!r}: {e}") from None
    if not rules:
        raise UsageError(f"categories file {path} defines no category")
    return CategoryScheme(tuple(r[0] for r in rules) + (OTHER,), tuple(rules))


def char_offsets_of_bytes(text: str) -> list[tuple[int, int]]:
    """The bytes tokenizer's offsets: byte i of the UTF-8 text belongs to character j."""
    out = []
    for j, ch in enumerate(text):
        out.extend([(j, j + 1)] * len(ch.encode("utf-8")))
    return out


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (exactly ``tokenizer.encode(text)``) and each token's character span."""
    if tokenizer.kind == "bytes":
        return tokenizer.encode(text), char_offsets_of_bytes(text)
    enc = tokenizer.backend.encode(text)  # the tokenizers library's encodings carry the offsets
    return list(enc.ids), [tuple(o) for o in enc.offsets]


def token_categories(char_labels: np.ndarray, offsets, num_categories: int, other: int,
                     whitespace: int | None = None) -> np.ndarray:
    """[N] int8: the majority category of each token's characters (ties: lowest index).

    Whitespace counts only for tokens that are all whitespace: byte-level BPE glues a leading
    space to words (" return"), which should stay a keyword. A token with an empty span (a
    special token) is ``other``.
    """
    out = np.full(len(offsets), other, dtype=np.int8)
    for i, (s, e) in enumerate(offsets):
        if e - s == 1:
            out[i] = char_labels[s]
        elif e > s:
            span = char_labels[s:e]
            if whitespace is not None and (span != whitespace).any():
                span = span[span != whitespace]
            out[i] = np.bincount(span, minlength=num_categories).argmax()
    return out


__all__ = ["BUILTIN", "CategoryScheme", "builtin_scheme", "label_python", "label_regex", "label_builtin",
           "label_user", "load_user_categories", "encode_with_offsets", "token_categories",
           "char_offsets_of_bytes"]
