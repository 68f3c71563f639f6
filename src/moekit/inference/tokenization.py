"""The tokenizer of a model folder, for running the model: text <-> ids, special tokens, chat.

Two kinds of folder:

- a Hugging Face folder: ``tokenizer.json`` (read by the ``tokenizers`` library, so encoding,
  normalization, byte fallback and decoding are the file's own), ``tokenizer_config.json`` for
  the named special tokens (``bos_token``, ``eos_token``, ...) and the chat template, which
  ``chat_template.jinja`` (transformers 5's file), ``additional_chat_templates/*.jinja`` or a
  legacy ``chat_template.json`` may hold instead;
- a moekit run folder: its ``tokenizer.json`` as written by ``moekit train`` (byte-level BPE or
  raw bytes, ``<|endoftext|>`` as end of text, no BOS, no chat template).

``encode(text)`` adds BOS/EOS exactly as transformers 5 does for a folder with a
``tokenizer.json``: the file's post-processor decides (transformers ignores ``add_bos_token``
in ``tokenizer_config.json`` then, and adds nothing when there is no post-processor).

Some transformers tokenizer classes rebuild part of the file's pipeline (LlamaTokenizer for
sentencepiece-style Llama 2 files, GPTNeoXTokenizer for OLMoE); ``hf_classes`` applies the
same rules, so a prompt gets the ids transformers gives it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from moekit.errors import UsageError
from moekit.fileio import read_json_object
from moekit.inference.chat_template import render_chat
from moekit.inference.detokenize import IncrementalDetokenizer
from moekit.inference.generation_config import GenerationDefaults, load_generation_defaults
from moekit.inference.hf_classes import class_default_specials, rebuild_pipeline, transformers_class

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
# The named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization: spaces before punctuation and contractions, which
# WordPiece decoding leaves. transformers never applies it to BPE models (it would corrupt text).
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TextTokenizer:
    """Text <-> token ids for inference, with the folder's special tokens and chat template.

    ``backend`` is a ``tokenizers.Tokenizer`` (or ``ByteBackend`` for moekit's raw-bytes runs);
    ``special_tokens`` maps names (``bos_token``...) to token text, as the chat template sees them.
    """

    def __init__(self, backend, special_tokens: Mapping[str, str], chat_templates: Mapping[str, str] | None = None,
                 source: str = "tokenizer", clean_up_spaces: bool = False):
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.chat_templates = dict(chat_templates or {})
        self.source = source
        self.clean_up_spaces = clean_up_spaces
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_id: int | None = self._id_of(self.bos_token)
        eos_id = self._id_of(self.eos_token)
        self.eos_ids: list[int] = [] if eos_id is None else [eos_id]
        self.special_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self.byte_fallback_ids: frozenset[int] = _byte_fallback_ids(backend)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # -- text <-> ids -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the BOS/EOS the folder's
        post-processor adds (as ``AutoTokenizer(text)``), without them none (as for chat prompts)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for before, after in _CLEANUP:
                text = text.replace(before, after)
        return text

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of one id (e.g. 'Ġworld', '<0xE2>'): for displays, not for decoding."""
        token = self.backend.id_to_token(int(token_id))
        return f"<id {token_id}>" if token is None else token

    def detokenizer(self, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_templates)

    def chat_template(self, tools: list | None = None) -> str:
        """The template transformers would pick: the only one, else ``tool_use`` when there are
        tools and such a template, else ``default``."""
        if not self.chat_templates:
            raise UsageError(f"{self.source} has no chat template (tokenizer_config.json 'chat_template' or "
                             f"{CHAT_TEMPLATE_FILE}); use plain generation with a prompt instead")
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" not in self.chat_templates:
            raise UsageError(f"{self.source} has several chat templates ({', '.join(sorted(self.chat_templates))}) "
                             "and none named 'default'")
        return self.chat_templates["default"]

    def apply_chat_template(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: list | None = None, **kwargs: Any) -> str:
        """The prompt text, byte-identical to transformers' ``apply_chat_template(tokenize=False)``."""
        return render_chat(self.chat_template(tools), messages, self.special_tokens,
                           add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)

    def encode_chat(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Ids of the rendered conversation; no special tokens added (the template writes its own
        BOS), as transformers' ``apply_chat_template(tokenize=True)``."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    def __repr__(self) -> str:
        return (f"TextTokenizer({self.source}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, chat_template={self.has_chat_template})")


def _byte_fallback_ids(backend) -> frozenset[int]:
    """The ids of '<0x00>'..'<0xFF>' when the model decodes them as raw bytes (BPE byte_fallback)."""
    if not getattr(getattr(backend, "model", None), "byte_fallback", False):
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


class _Encoding:
    def __init__(self, ids: list[int]):
        self.ids = ids


class _Special:
    special = True


class ByteBackend:
    """moekit's raw-bytes tokenizer (ids 0-255 are bytes, 256 is end of text) behind the part
    of the ``tokenizers.Tokenizer`` interface that ``TextTokenizer`` uses."""

    EOS_ID, EOS = 256, "<|endoftext|>"
    model = None  # no byte fallback: Python's decoder replaces invalid bytes locally

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return 257

    def get_added_tokens_decoder(self) -> dict[int, _Special]:
        return {self.EOS_ID: _Special()}

    def encode(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        return _Encoding(list(text.encode("utf-8")))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # Like tokenizers: skipped special tokens go first, so bytes around them join up.
        if skip_special_tokens:
            ids = [i for i in ids if i < 256]
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out += [run.decode("utf-8", errors="replace"), self.EOS]
            run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        return self.EOS_ID if token == self.EOS else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.EOS if token_id == self.EOS_ID else (f"<0x{token_id:02X}>" if 0 <= token_id < 256 else None)


# -- loading ------------------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken record."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict, legacy_map: dict, class_defaults: dict[str, str]) -> dict[str, str]:
    """Named special tokens: the standard names, then model-specific ``*_token`` keys
    (transformers 5 passes those to templates too). A name the config leaves out comes from
    special_tokens_map.json, else the tokenizer class's default; one set to null stays unset."""
    names = list(SPECIAL_TOKEN_NAMES) + [k for k in config if k.endswith("_token") and k not in SPECIAL_TOKEN_NAMES]
    tokens = {}
    for name in names:
        if name in config:
            content = _token_content(config[name])
        else:
            content = _token_content(legacy_map.get(name)) or class_defaults.get(name)
        if content is not None:
            tokens[name] = content
    return tokens


def _extra_special_tokens(config: dict) -> list[str]:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    values = extra.values() if isinstance(extra, dict) else extra
    return [c for c in (_token_content(v) for v in values) if c is not None]


def _add_missing_specials(backend, tokens: Iterable[str]) -> None:
    """Special tokens named in the config but absent from tokenizer.json join the vocabulary as
    special tokens, new ids at the end (transformers does the same when it loads the folder)."""
    from tokenizers import AddedToken

    missing = [t for t in dict.fromkeys(tokens) if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def read_chat_templates(folder: Path, config: dict) -> dict[str, str]:
    """name -> template: chat_template.jinja ('default') and additional_chat_templates/*.jinja
    win over the legacy chat_template.json and tokenizer_config.json's 'chat_template'."""
    templates = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if value is None and (folder / LEGACY_CHAT_TEMPLATE_FILE).is_file():
        value = read_json_object(folder / LEGACY_CHAT_TEMPLATE_FILE).get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):  # [{"name": ..., "template": ...}], the older multi-template form
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if isinstance(v, str)}
    return {}


def _model_type(folder: Path) -> str | None:
    """config.json's model_type (transformers picks the tokenizer class by it, too)."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # the model loader reports a broken config.json; the tokenizer does not need it
    return value if isinstance(value, str) else None


def _missing_tokenizer_message(folder: Path) -> str:
    if (folder / "tokenizer.model").is_file():
        return (f"{folder} has tokenizer.model (sentencepiece) but no {TOKENIZER_FILE}; moekit reads "
                f"{TOKENIZER_FILE} only: convert it once with transformers "
                "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    if (folder / "vocab.json").is_file():
        return (f"{folder} has vocab.json/merges.txt but no {TOKENIZER_FILE}; convert them once with transformers "
                "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    return f"no {TOKENIZER_FILE} in {folder}: the model folder needs its tokenizer to turn text into token ids"


def _load_hf(folder: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise UsageError(_missing_tokenizer_message(folder))
    try:
        text = path.read_text(encoding="utf-8")
        backend = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise UsageError(f"{path} is not a tokenizers JSON file ({' '.join(str(e).split())})") from None
    config = read_json_object(folder / TOKENIZER_CONFIG_FILE) if (folder / TOKENIZER_CONFIG_FILE).is_file() else {}
    cls = transformers_class(config, _model_type(folder), text)
    rebuild_pipeline(backend, cls, config)
    legacy = read_json_object(folder / SPECIAL_TOKENS_MAP_FILE) if (folder / SPECIAL_TOKENS_MAP_FILE).is_file() else {}
    specials = _special_tokens(config, legacy, class_default_specials(cls))
    _add_missing_specials(backend, [*specials.values(), *_extra_special_tokens(config)])
    clean_up = bool(config.get("clean_up_tokenization_spaces")) and type(backend.model).__name__ != "BPE"
    return TextTokenizer(backend, specials, read_chat_templates(folder, config), str(folder), clean_up)


def _load_run(folder: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    from moekit.data.tokenizer import EOS
    from moekit.data.tokenizer import load_tokenizer as load_run_tokenizer

    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise UsageError(f"no {TOKENIZER_FILE} in the run folder {folder} (moekit train writes it; was it deleted?)")
    run_tok = load_run_tokenizer(path)
    backend = ByteBackend() if run_tok.kind == "bytes" else Tokenizer.from_str(run_tok.to_json())
    # The token that ended the training documents: <|endoftext|>, or the eos of the
    # tokenizer_config.json a Hugging Face start model brought (Llama's </s>), with its templates.
    eos = EOS if run_tok.kind == "bytes" else backend.id_to_token(run_tok.eos_id)
    config = run_tok.hf_config or {}
    return TextTokenizer(backend, {"eos_token": eos}, read_chat_templates(folder, config), str(folder))


def load_tokenizer(folder: str | Path) -> TextTokenizer:
    """The tokenizer of a moekit run folder or a Hugging Face model folder (see the module doc)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"no such model folder: {folder}")
    from moekit.training.run import is_run_dir

    return _load_run(folder) if is_run_dir(folder) or _quantized_from_run(folder) else _load_hf(folder)


def _quantized_from_run(folder: Path) -> bool:
    """A folder ``moekit quantize`` wrote from a run: moekit's own config (no model_type) plus a
    ``quantization`` entry, and the run's tokenizer.json, which is moekit's format too."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and isinstance(config.get("quantization"), dict) and "model_type" not in config


__all__ = ["TextTokenizer", "ByteBackend", "load_tokenizer", "read_chat_templates", "IncrementalDetokenizer",
           "GenerationDefaults", "load_generation_defaults", "SPECIAL_TOKEN_NAMES"]
