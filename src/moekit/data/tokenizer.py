"""Tokenizers: byte-level BPE trained with the ``tokenizers`` library, or raw bytes.

Both end every document with one end-of-text token (``eos_id``); a Hugging Face tokenizer
without ``<|endoftext|>`` (Llama, Mistral) uses the eos token its tokenizer_config.json names. A tokenizer is saved as one
JSON file (``tokenizer.json`` in a run folder): the ``tokenizers`` format for BPE, a small
moekit record for bytes. ``fingerprint`` hashes that JSON, so a data cache built with one
tokenizer is never read with another.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from moekit.errors import UsageError
from moekit.fileio import atomic_write_text

EOS = "<|endoftext|>"
HF_CONFIG = "tokenizer_config.json"
_BYTES_JSON = {"moekit_tokenizer": "bytes", "version": 1}


class TextTokenizer:
    """Text <-> token ids. ``kind`` is "bpe" or "bytes"; ids are < ``vocab_size``."""

    def __init__(self, kind: str, backend=None, hf_config: dict | None = None):
        self.kind = kind
        self._tok = backend  # a tokenizers.Tokenizer for "bpe", None for "bytes"
        # A Hugging Face tokenizer's tokenizer_config.json, when it came with one: it names the
        # document separator of tokenizers without <|endoftext|>, and is saved beside tokenizer.json.
        self.hf_config = hf_config
        if kind == "bytes":
            self.vocab_size, self.eos_id = 257, 256  # 256 byte values + end-of-text
        else:
            self.vocab_size = backend.get_vocab_size()
            self.eos_id = _separator_id(backend, hf_config or {})

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` behind a BPE tokenizer, None for bytes: for callers that
        need more than ids from it, such as each token's character offsets."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-text token appended)."""
        if self._tok is None:
            return list(text.encode("utf-8"))
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._tok is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self._tok is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self._tok.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps(_BYTES_JSON) if self._tok is None else self._tok.to_str()

    @property
    def fingerprint(self) -> str:
        separator = "" if self._tok is None or self._tok.token_to_id(EOS) == self.eos_id else f"\nsep={self.eos_id}"
        return hashlib.sha256((self.to_json() + separator).encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        """tokenizer.json at ``path``, and the tokenizer_config.json it came with beside it
        (unless one is there: a run folder keeps the file its source shipped)."""
        atomic_write_text(path, self.to_json())
        beside = Path(path).parent / HF_CONFIG
        if self.hf_config is not None and not beside.exists():
            atomic_write_text(beside, json.dumps(self.hf_config, ensure_ascii=False, indent=2))

    def __repr__(self) -> str:
        return f"TextTokenizer({self.kind}, vocab_size={self.vocab_size})"


def _separator_id(backend, hf_config: dict) -> int:
    """The document separator: <|endoftext|> (GPT-2, Qwen, moekit's BPE), else the eos token
    of tokenizer_config.json (Llama/Mistral's </s>), else its bos token (a document start
    separates documents as well)."""
    if backend.token_to_id(EOS) is not None:
        return backend.token_to_id(EOS)
    for key in ("eos_token", "bos_token"):
        text = _token_text(hf_config.get(key))
        if text is not None and backend.token_to_id(text) is not None:
            return backend.token_to_id(text)
    raise UsageError(f"the BPE tokenizer has no {EOS} token, and no eos_token or bos_token of its "
                     f"{HF_CONFIG} is in its vocabulary: nothing can separate documents")


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken record."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def bytes_tokenizer() -> TextTokenizer:
    return TextTokenizer("bytes")


def train_bpe(texts: Iterable[str], vocab_size: int = 8192) -> TextTokenizer:
    """Byte-level BPE (GPT-2's scheme: no unknown tokens, any text round-trips) on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 for BPE (256 bytes + end-of-text + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so nothing is unknown
        show_progress=False,
    )
    _interruptible(lambda stop: tok.train_from_iterator(_until(texts, stop), trainer))
    return TextTokenizer("bpe", tok)


def _until(texts: Iterable[str], stop: threading.Event) -> Iterator[str]:
    for text in texts:
        if stop.is_set():
            return
        yield text


def _interruptible(work) -> None:
    """Run ``work(stop)`` so that Ctrl-C interrupts it.

    The ``tokenizers`` trainer swallows a KeyboardInterrupt raised while it pulls texts, and
    Python runs signal handlers only in the main thread between bytecodes, which it never
    reaches while the Rust trainer runs: Ctrl-C went unnoticed. So the work runs in a
    thread while the main thread waits in an interruptible join; on Ctrl-C ``stop`` ends the
    texts early, the thread is abandoned (a daemon: it dies with the process), and the
    KeyboardInterrupt goes on up, before anything is saved.
    """
    if threading.current_thread() is not threading.main_thread():
        work(threading.Event())  # no signal arrives here anyway
        return
    stop, errors = threading.Event(), []

    def run() -> None:
        try:
            work(stop)
        except BaseException as e:  # handed to the main thread
            errors.append(e)

    worker = threading.Thread(target=run, name="moekit-bpe", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        stop.set()
        raise
    if errors:
        raise errors[0]


def tokenizer_from_json(text: str, source: str = "tokenizer", hf_config: dict | None = None) -> TextTokenizer:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{source} is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):  # valid JSON, but not a tokenizer: say so instead of failing inside
        raise UsageError(f"{source} is not a tokenizer file: it holds a JSON {type(data).__name__}, not an object")
    if data.get("moekit_tokenizer") == "bytes":
        return bytes_tokenizer()
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise UsageError(f"{source} is not a tokenizers JSON file ({e})") from None
    return TextTokenizer("bpe", backend, hf_config)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read tokenizer {path}: {e.strerror or e}") from None
    return tokenizer_from_json(text, str(path), _read_hf_config(path.parent / HF_CONFIG))


def _read_hf_config(path: Path) -> dict | None:
    """tokenizer_config.json beside a tokenizer.json, if any (a Hugging Face folder's)."""
    if not path.is_file():
        return None
    from moekit.fileio import read_json_object

    return read_json_object(path)


__all__ = ["TextTokenizer", "bytes_tokenizer", "train_bpe", "load_tokenizer", "tokenizer_from_json", "EOS"]
