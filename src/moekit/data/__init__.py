"""Text data for training: sources, tokenizers, and a cached, memory-mapped token split."""

from moekit.data.dataset import (
    DataConfig,
    TokenData,
    check_length,
    default_cache_dir,
    prepare_data,
    train_batch,
    validation_batches,
)
from moekit.data.sources import Corpus, Document, default_corpus_root, resolve_sources
from moekit.data.tokenizer import TextTokenizer, bytes_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "DataConfig",
    "TokenData",
    "prepare_data",
    "check_length",
    "train_batch",
    "validation_batches",
    "default_cache_dir",
    "Corpus",
    "Document",
    "default_corpus_root",
    "resolve_sources",
    "TextTokenizer",
    "bytes_tokenizer",
    "load_tokenizer",
    "train_bpe",
]
