"""Small real Hugging Face tokenizer folders, trained in the tests with the ``tokenizers`` library.

Two schemes cover what models ship:

- ``byte_level``: GPT-2 style byte-level BPE (Qwen, DeepSeek-V3, OLMoE): every byte is a symbol
  ('Ġ' is a space), so any text round-trips; multi-byte characters span several tokens.
- ``sentencepiece``: Llama/Mistral style BPE over '▁'-marked words with byte fallback
  (``<0xE2>`` tokens for characters outside the vocabulary), the Metaspace pre-tokenizer that
  prepends '▁' to the first word, and the decoder that strips it again.

Each folder gets a ``tokenizer_config.json`` with named special tokens, optionally a chat
template, and a post-processor that adds BOS (when ``bos`` is given), as the published ones do.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the model routes every token to two experts of eight and the router learns which "
         "expert is best for each token while a balancing loss keeps the load even across experts "
         "naïve café résumé déjà vu über straße").split()

# Text with what the tests must get right: accents inside the vocabulary, characters only byte
# fallback / byte-level symbols can spell (euro sign, CJK, emoji), runs of spaces, newlines.
SAMPLES = [
    "the router learns which expert is best",
    " leading space and  two spaces",
    "naïve café € 5 — 日本語 🙂 done",
    "line one\nline two\n\n  indented",
    "über straße déjà vu",
    "emoji 🧪🔬 and 中文 mixed with experts",
]


def _corpus() -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]


def byte_level(folder: Path, specials: list[str], bos: str | None = None, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json with ``specials`` as special added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def sentencepiece(folder: Path, specials: list[str], bos: str | None = "<s>", vocab_size: int = 400,
                  legacy_normalizer: bool = False) -> Path:
    """A Llama-style tokenizer.json: BPE with byte fallback, Metaspace, '<unk>' first. With
    ``legacy_normalizer`` the older form Mixtral and Llama 2 ship: a normalizer that prepends '▁'
    and turns spaces into '▁', no pre-tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # Train merges on '▁'-words, then rebuild the model with the 256 byte-fallback tokens in the
    # vocabulary itself (not as added tokens: those would count as special and vanish on decode).
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False, limit_alphabet=60))
    model = json.loads(trained.to_str())["model"]
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
    vocab = {s: i for i, s in enumerate(specials)}
    for piece in [f"<0x{b:02X}>" for b in range(256)] + pieces:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    if legacy_normalizer:
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def write_config(folder: Path, chat_template: str | None = None, **fields) -> Path:
    """tokenizer_config.json with ``fields`` (bos_token=..., eos_token=..., tokenizer_class=...)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **fields}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return folder


def qwen_like(folder: Path, chat_template: str | None = None) -> Path:
    """Byte-level BPE, no BOS, '<|im_end|>' as EOS: how Qwen2/Qwen3 ship."""
    byte_level(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    return write_config(folder, chat_template, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                        bos_token=None, tokenizer_class="Qwen2Tokenizer")


def deepseek_like(folder: Path, chat_template: str | None = None) -> Path:
    """Byte-level BPE with a BOS post-processor: how DeepSeek-V3 ships."""
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    byte_level(folder, [bos, eos, "<｜User｜>", "<｜Assistant｜>"], bos=bos)
    return write_config(folder, chat_template, bos_token={"__type": "AddedToken", "content": bos, "special": True},
                        eos_token={"__type": "AddedToken", "content": eos, "special": True}, add_bos_token=True)


def llama_like(folder: Path, chat_template: str | None = None) -> Path:
    """Sentencepiece-style BPE with byte fallback and BOS: how Mixtral/Mistral ship."""
    sentencepiece(folder, ["<unk>", "<s>", "</s>"])
    return write_config(folder, chat_template, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                        add_bos_token=True, add_eos_token=False, tokenizer_class="LlamaTokenizer")


def mixtral_like(folder: Path, chat_template: str | None = None) -> Path:
    """Mixtral-8x7B-Instruct's layout: the legacy sentencepiece tokenizer.json, LlamaTokenizer
    declared, config.json model_type mixtral (transformers then uses the file as written)."""
    sentencepiece(folder, ["<unk>", "<s>", "</s>"], legacy_normalizer=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}))
    return write_config(folder, chat_template, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                        add_bos_token=True, add_eos_token=False, legacy=True, tokenizer_class="LlamaTokenizer")
