"""A model folder's generation defaults: ``generation_config.json``, as transformers reads it.

The file holds what the model's authors recommend (Qwen3: sample at temperature 0.6, top-p
0.95, top-k 20) and, most importantly, every id that ends a reply: chat models stop on an
end-of-turn token that is often not the tokenizer's ``eos_token`` (``<|im_end|>`` next to
``<|endoftext|>``). Values the file leaves out take transformers' defaults (greedy, top-k 50,
top-p 1), so a folder without the file behaves as ``model.generate()`` would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from moekit.errors import UsageError
from moekit.fileio import read_json_object

GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"


@dataclass
class GenerationDefaults:
    """Sampling defaults for one model folder; a CLI flag or engine argument overrides each."""

    eos_ids: list[int] = field(default_factory=list)  # stop on any: the folder's ids, then the tokenizer's
    bos_id: int | None = None
    pad_id: int | None = None
    do_sample: bool = False  # transformers' default: greedy unless the folder asks for sampling
    temperature: float = 1.0  # logits / temperature before softmax; used when do_sample
    top_k: int = 50  # keep the k likeliest tokens; 0 = off (transformers' default is 50)
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2019): the smallest set with mass >= top_p
    min_p: float = 0.0  # drop tokens below min_p * p(top token); 0 = off
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019): divide positive logits of seen tokens
    max_new_tokens: int | None = None  # None: the caller decides
    source: str | None = None  # the file these came from; None = built-in defaults

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ids(value: Any) -> list[int]:
    """An id field of generation_config.json / config.json: an int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _first(value: Any) -> int | None:
    ids = _ids(value)
    return ids[0] if ids else None


def _merged(*groups: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(i for group in groups for i in group))


def load_generation_defaults(folder: str | Path, tokenizer=None) -> GenerationDefaults:
    """The folder's ``generation_config.json`` (or, like transformers, the token ids of its
    ``config.json`` when there is none), with the tokenizer's EOS ids added to the stop ids.
    ``tokenizer`` (a ``TextTokenizer``) defaults to the folder's own, when it has one."""
    folder = Path(folder)
    if tokenizer is None and (folder / "tokenizer.json").is_file():
        from moekit.inference.tokenization import load_tokenizer

        tokenizer = load_tokenizer(folder)
    tokenizer_eos_ids = tokenizer.eos_ids if tokenizer is not None else []
    tokenizer_bos_id = tokenizer.bos_id if tokenizer is not None else None
    path = folder / GENERATION_CONFIG_FILE
    if path.is_file():
        data, source = read_json_object(path), str(path)
    else:
        model = folder / MODEL_CONFIG_FILE
        data = read_json_object(model) if model.is_file() else {}
        data = {k: data[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if k in data}
        source = None
    values = {k: data[k] for k in ("do_sample", "temperature", "top_k", "top_p", "min_p",
                                   "repetition_penalty", "max_new_tokens") if data.get(k) is not None}
    try:
        return GenerationDefaults(
            eos_ids=_merged(_ids(data.get("eos_token_id")), tokenizer_eos_ids),
            bos_id=_first(data.get("bos_token_id")) if data.get("bos_token_id") is not None else tokenizer_bos_id,
            pad_id=_first(data.get("pad_token_id")),
            source=source, **values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path}: {e}") from None


__all__ = ["GenerationDefaults", "load_generation_defaults", "GENERATION_CONFIG_FILE"]
