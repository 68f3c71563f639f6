"""Text -> a tokenized, cached, memory-mapped train/validation split, and batches from it.

``prepare_data`` does, for a ``DataConfig``:

1. Scan the corpus once: validate every document and choose its split by a seeded hash of
   its name (so the split is by document and deterministic for ``split_seed``).
2. Get the tokenizer: the one given (a run's own, on resume), raw bytes, or a byte-level BPE
   trained on the training split (cached under ``CACHE/tokenizers/``).
3. Encode every document, end it with the end-of-text token and append it to ``train.bin``
   or ``val.bin`` (uint16 when the vocabulary fits, else uint32).

The result lives in ``CACHE/data/KEY/`` where KEY hashes the sources (paths, sizes,
modification times), the split settings and the tokenizer, so a second run maps the files
and starts at once. An entry is built in a temporary folder and renamed into place only
when complete: a failed or interrupted build leaves nothing behind that a later run reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from moekit.config import check_fields, check_float, check_int
from moekit.data.sources import Corpus, Document
from moekit.data.tokenizer import TextTokenizer, bytes_tokenizer, load_tokenizer, train_bpe
from moekit.errors import ConfigError, UsageError
from moekit.fileio import atomic_write_json, fsync_dir, fsync_file, make_temp_dir

CACHE_VERSION = 1
_ENCODE_CHUNK = 256  # documents per encode_batch call


@dataclass
class DataConfig:
    """What text a run trains on and how it is tokenized and split."""

    sources: list[str] = field(default_factory=list)  # files, folders, globs; [] = Python's stdlib source
    text_field: str = "text"  # the text field of .jsonl lines and the text column of .parquet files
    tokenizer: str = "bpe"  # bpe (trained on the training split) | bytes (256 symbols + end-of-text) | a tokenizer.json
    vocab_size: int = 8192  # BPE vocabulary; the model's vocab_size follows the tokenizer
    tokenizer_train_chars: int = 32_000_000  # BPE trains on at most this many characters of training text
    val_fraction: float = 0.05  # share of documents held out for validation
    split_seed: int = 0  # seeds the document split (kept apart from the training seed)

    def __post_init__(self) -> None:
        if not isinstance(self.sources, (list, tuple)) or not all(isinstance(s, (str, os.PathLike)) for s in self.sources):
            raise ConfigError(f"data.sources must be a list of paths, got {self.sources!r}")
        self.sources = [str(s) for s in self.sources]
        if not self.text_field or not isinstance(self.text_field, str):
            raise ConfigError(f"data.text_field must be a non-empty string, got {self.text_field!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigError(f"data.tokenizer must be bpe, bytes or a tokenizer.json path, got {self.tokenizer!r}")
        check_int("data.vocab_size", self.vocab_size, minimum=258)
        check_int("data.tokenizer_train_chars", self.tokenizer_train_chars)
        check_float("data.val_fraction", self.val_fraction, 0.0, strict=True)
        if self.val_fraction > 1.0:
            raise ConfigError(f"data.val_fraction must be <= 1, got {self.val_fraction}")
        check_int("data.split_seed", self.split_seed, minimum=0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataConfig":
        return cls(**check_fields(cls, data, "data"))


@dataclass
class TokenData:
    """A prepared corpus: token arrays (memory-mapped, read-only) and the tokenizer that made them."""

    train: np.ndarray  # [N_train] token ids, documents separated by tokenizer.eos_id
    val: np.ndarray  # [N_val]
    tokenizer: TextTokenizer
    meta: dict  # counts: documents, characters, skipped files, tokens per split
    path: Path  # the cache entry


def default_cache_dir() -> Path:
    """$MOEKIT_CACHE, else $XDG_CACHE_HOME/moekit, else ~/.cache/moekit."""
    if os.environ.get("MOEKIT_CACHE"):
        return Path(os.environ["MOEKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moekit"


def split_value(name: str, split_seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document name and the seed."""
    digest = hashlib.sha256(f"{split_seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def validation_names(names: Iterable[str], cfg: DataConfig) -> set[str]:
    """The split rule, defined here only: a document is held out when the seeded hash of its
    name is below ``val_fraction``; a corpus of several documents of which none is held out
    holds out the one with the lowest hash (so a small corpus still has a validation set)."""
    val, lowest, count = set(), None, 0
    for name in names:
        count += 1
        v = split_value(name, cfg.split_seed)
        if v < cfg.val_fraction:
            val.add(name)
        elif lowest is None or v < lowest[0]:
            lowest = (v, name)
    if not val and count > 1:
        val.add(lowest[1])
    return val


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _scan(corpus: Corpus, cfg: DataConfig) -> tuple[set[str], dict]:
    """Pass 1: validate all documents and choose the validation set (names)."""
    names, n_chars = [], 0
    for doc in corpus.documents():
        names.append(doc.name)
        n_chars += len(doc.text)
    if not names:
        note = f"; {len(corpus.skipped)} file(s) skipped as not UTF-8" if corpus.skipped else ""
        raise UsageError(f"the corpus is empty: no text in {corpus.description}{note}")
    val = validation_names(names, cfg)
    stats = dict(documents=len(names), characters=n_chars, val_documents=len(val),
                 skipped_files=[str(p) for p in corpus.skipped])
    return val, stats


def _training_texts(corpus: Corpus, val: set[str], limit: int) -> Iterator[str]:
    used = 0
    for doc in corpus.documents():
        if doc.name in val:
            continue
        if used >= limit:
            return
        used += len(doc.text)
        yield doc.text


def _get_tokenizer(cfg: DataConfig, corpus: Corpus, split: "_LazySplit", cache: Path, log) -> TextTokenizer:
    if cfg.tokenizer == "bytes":
        return bytes_tokenizer()
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer)
    # The split is a function of the corpus and these settings, so they key the trained tokenizer.
    key = _key(CACHE_VERSION, corpus.fingerprint(), cfg.text_field, cfg.val_fraction, cfg.split_seed,
               cfg.vocab_size, cfg.tokenizer_train_chars)
    path = cache / "tokenizers" / f"{key}.json"
    if path.exists():
        try:
            return load_tokenizer(path)
        except UsageError as e:  # truncated or damaged on disk: rebuild it, as a bad data entry is
            log(f"note: the cached tokenizer is unreadable ({e}); training it again")
    val, _ = split.get()
    log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on the training split")
    t0 = time.perf_counter()
    tok = train_bpe(_training_texts(corpus, val, cfg.tokenizer_train_chars), cfg.vocab_size)
    tok.save(path)
    log(f"  tokenizer trained in {time.perf_counter() - t0:.1f}s: {tok.vocab_size} tokens")
    return tok


class _LazySplit:
    """Pass 1, run at most once and only when a tokenizer or cache entry must be built."""

    def __init__(self, corpus: Corpus, cfg: DataConfig):
        self.corpus, self.cfg, self.result = corpus, cfg, None

    def get(self) -> tuple[set[str], dict]:
        if self.result is None:
            self.result = _scan(self.corpus, self.cfg)
        return self.result


def _encode_into(folder: Path, corpus: Corpus, val: set[str], tok: TextTokenizer) -> dict:
    """Pass 3: encode every document into folder/train.bin and folder/val.bin."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    counts = {"train": 0, "val": 0}
    with open(folder / "train.bin", "wb") as f_train, open(folder / "val.bin", "wb") as f_val:
        files = {"train": f_train, "val": f_val}

        def flush(docs: list[Document]) -> None:
            for doc, ids in zip(docs, tok.encode_batch([d.text for d in docs])):
                split = "val" if doc.name in val else "train"
                arr = np.asarray(ids + [tok.eos_id], dtype=dtype)
                arr.tofile(files[split])
                counts[split] += arr.size

        chunk: list[Document] = []
        for doc in corpus.documents():
            chunk.append(doc)
            if len(chunk) == _ENCODE_CHUNK:
                flush(chunk)
                chunk = []
        flush(chunk)
    for name in ("train.bin", "val.bin"):
        fsync_file(folder / name)
    return {"dtype": np.dtype(dtype).name, "train_tokens": counts["train"], "val_tokens": counts["val"]}


def _open_entry(folder: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """Map a complete cache entry; None when it is missing, its files disagree with meta.json, or
    it holds a token id the tokenizer cannot produce (a damaged file: the model would index past
    its embedding). One pass over the ids: about 30 ms per 50M tokens."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = []
        for split in ("train", "val"):
            n, path = meta[f"{split}_tokens"], folder / f"{split}.bin"
            if path.stat().st_size != n * np.dtype(meta["dtype"]).itemsize:
                return None
            arrays.append(np.memmap(path, dtype=meta["dtype"], mode="r", shape=(n,)) if n else
                          np.zeros(0, dtype=meta["dtype"]))
    except (OSError, ValueError, KeyError):
        return None
    if any(a.size and int(a.max()) >= vocab_size for a in arrays):
        return None
    return arrays[0], arrays[1], meta


def prepare_data(
    cfg: DataConfig,
    cache_dir: str | Path | None = None,
    tokenizer: TextTokenizer | None = None,
    log: Callable[[str], None] = print,
) -> TokenData:
    """Tokenize ``cfg``'s corpus (or reuse the cache) -> ``TokenData``. See the module docstring.

    ``tokenizer`` overrides ``cfg.tokenizer`` (a run reuses its own). Raises ``UsageError``
    for bad input; nothing is written to the cache's data folder unless the entry is complete.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus = Corpus(cfg.sources, cfg.text_field)
    split = _LazySplit(corpus, cfg)
    if tokenizer is None:
        tokenizer = _get_tokenizer(cfg, corpus, split, cache, log)
    key = _key(CACHE_VERSION, corpus.fingerprint(), cfg.text_field, cfg.val_fraction, cfg.split_seed,
               tokenizer.fingerprint)
    folder = cache / "data" / key
    entry = _open_entry(folder, tokenizer.vocab_size)
    if entry is None:
        if folder.exists():
            log(f"the data cache entry {folder} failed its check (sizes or token ids); rebuilding it")
        val, stats = split.get()
        _build_entry(folder, corpus, val, tokenizer, stats, log)
        entry = _open_entry(folder, tokenizer.vocab_size)
        if entry is None:
            raise UsageError(f"the data cache entry {folder} could not be read back after writing it")
    train, val_tokens, meta = entry
    return TokenData(train=train, val=val_tokens, tokenizer=tokenizer, meta=meta, path=folder)


STALE_TEMP_S = 24 * 3600


def _count(n: int, noun: str) -> str:
    """ "1 document", "2 documents", "1,024 documents"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _remove_stale_temps(cache: Path) -> None:
    """Temp folders of builds that were killed before their cleanup ran (SIGKILL, power loss).
    A build touches its folder as it writes, so one a day old is no live build's."""
    now = time.time()
    for path in cache.glob(".tmp-*"):
        try:
            if now - path.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # another run removed it first
            pass


def _build_entry(folder: Path, corpus: Corpus, val: set[str], tok: TextTokenizer, stats: dict, log) -> None:
    log(f"tokenizing {_count(stats['documents'], 'document')} ({stats['characters'] / 1e6:.1f}M characters) "
        f"of {corpus.description}")
    if stats["skipped_files"]:
        log(f"  skipped {_count(len(stats['skipped_files']), 'file')} that are not UTF-8 text, "
            f"e.g. {stats['skipped_files'][0]}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder.parent)
    tmp = make_temp_dir(folder.parent, f".tmp-{folder.name}-")
    try:
        t0 = time.perf_counter()
        counts = _encode_into(tmp, corpus, val, tok)
        tok.save(tmp / "tokenizer.json")
        meta = dict(stats, **counts, tokenizer=tok.kind, vocab_size=tok.vocab_size, sources=corpus.description,
                    version=CACHE_VERSION)
        atomic_write_json(tmp / "meta.json", meta)
        fsync_dir(tmp)
        if folder.exists():  # a stale entry (failed the checks above): replace it
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if _open_entry(folder, tok.vocab_size) is None:  # not a concurrent run that finished first
                raise
        fsync_dir(folder.parent)
        log(f"  {counts['train_tokens']:,} training and {counts['val_tokens']:,} validation tokens "
            f"in {time.perf_counter() - t0:.1f}s, cached in {folder}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_length(data: TokenData, seq_len: int, need_train: bool = True) -> None:
    """One sequence needs seq_len + 1 tokens (inputs and shifted targets) in each split used."""
    need = seq_len + 1
    splits = (("training", data.train), ("validation", data.val)) if need_train else (("validation", data.val),)
    for name, tokens in splits:
        if len(tokens) < need:
            raise UsageError(
                f"the corpus is too short: the {name} split has {len(tokens)} tokens, fewer than one "
                f"sequence (seq_len + 1 = {need}); give more text or a smaller --seq-len"
            )


def train_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, index: int) -> torch.Tensor:
    """Micro-batch number ``index``: [B, S+1] int64 windows at random offsets.

    A pure function of (seed, index): the data position of a run is just its step, so a
    resumed run reads exactly the batches an uninterrupted one would have.
    """
    rng = np.random.default_rng([seed, index])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # last valid start: N - S - 1
    return torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))


def validation_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
    """Up to ``max_batches`` batches [B, S+1] of non-overlapping windows spread evenly over the
    validation tokens; the same windows every time, so every evaluation compares like with like."""
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise UsageError(f"the validation split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    k = min(n_windows, max_batches * batch_size)
    picks = np.unique(np.linspace(0, n_windows - 1, k).round().astype(np.int64))
    windows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in picks]).astype(np.int64)
    return [torch.from_numpy(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]


__all__ = [
    "DataConfig",
    "TokenData",
    "prepare_data",
    "check_length",
    "train_batch",
    "validation_batches",
    "default_cache_dir",
    "split_value",
]
