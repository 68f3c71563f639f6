"""What transformers 5's AutoTokenizer does to a folder's tokenizer.json besides reading it.

transformers picks a tokenizer class from ``tokenizer_config.json``'s ``tokenizer_class`` and
``config.json``'s ``model_type``; some classes rebuild the pipeline from the file's vocabulary
and merges instead of using the file whole. moekit copies the rules that change token ids for
the families it loads, so a prompt gets the ids transformers would give it:

1. Resolve the class: Mistral-family model types (mixtral, mistral) use the file as written;
   model type qwen2 always gets Qwen2Tokenizer; a file that is byte-level but declared
   LlamaTokenizer (Llama 3, DeepSeek-V3) is used as written; otherwise the declared class.
2. LlamaTokenizer (sentencepiece-style files: Llama 2 and fine-tunes): no normalizer, a
   Metaspace pre-tokenizer ('▁' before the first word, before every segment with
   ``legacy: true``, never without ``add_prefix_space``), a decoder mapping '▁' back to spaces.
3. GPTNeoXTokenizer (OLMoE): NFC, GPT-2 byte-level splitting, and a post-processor that adds
   no BOS/EOS (transformers drops the file's, and ignores ``add_bos_token`` next to a tokenizer.json).
4. Special tokens the config does not name take the class's defaults (``<s>`` for Llama,
   ``<|endoftext|>`` for GPT-NeoX and Qwen2); a name set to null stays unset.

Qwen2Tokenizer's own pipeline (NFC, Qwen's split regex, byte-level) is what Qwen folders ship
in their tokenizer.json, so that file is used as it is.
"""

from __future__ import annotations

GENERIC = "TokenizersBackend"
# model_types transformers maps to its generic backend (tokenizer.json as written) whatever the
# declared class, when the mistral-common package is not installed.
FILE_AS_IS_MODEL_TYPES = ("mistral", "mixtral", "ministral", "ministral3", "mistral3", "pixtral", "voxtral")
# model_types whose declared class transformers overrides with its registered one.
REGISTERED_CLASS = {"qwen2": "Qwen2Tokenizer"}
CLASS_DEFAULT_SPECIALS = {
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "GPTNeoXTokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                         "pad_token": "<|padding|>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}


def transformers_class(config: dict, model_type: str | None, tokenizer_json: str) -> str:
    """The class AutoTokenizer loads for this folder (plan step 1), ``Fast`` suffix dropped."""
    declared = (config.get("tokenizer_class") or GENERIC).removesuffix("Fast")
    if model_type in FILE_AS_IS_MODEL_TYPES:
        return GENERIC
    if model_type in REGISTERED_CLASS:
        return REGISTERED_CLASS[model_type]
    if declared == "LlamaTokenizer" and '"ByteLevel"' in tokenizer_json:
        return GENERIC
    return GENERIC if declared == "PreTrainedTokenizer" else declared


def rebuild_pipeline(backend, cls: str, config: dict) -> None:
    """Plan steps 2 and 3 on a ``tokenizers.Tokenizer`` loaded from the file (in place)."""
    if cls == "LlamaTokenizer":
        _llama(backend, config)
    elif cls == "GPTNeoXTokenizer":
        _gpt_neox(backend, config)


def _flag(config: dict, name: str, default: bool) -> bool:
    return default if config.get(name) is None else bool(config[name])


def _llama(backend, config: dict) -> None:
    from tokenizers import decoders, pre_tokenizers

    add_prefix_space = _flag(config, "add_prefix_space", True)
    scheme = ("always" if _flag(config, "legacy", False) else "first") if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:  # the space Metaspace put before the first word comes off again
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)


def _gpt_neox(backend, config: dict) -> None:
    from tokenizers import decoders, normalizers, pre_tokenizers, processors

    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=_flag(config, "add_prefix_space", False),
                                                     trim_offsets=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])


def class_default_specials(cls: str) -> dict[str, str]:
    return dict(CLASS_DEFAULT_SPECIALS.get(cls, {}))


__all__ = ["transformers_class", "rebuild_pipeline", "class_default_specials", "FILE_AS_IS_MODEL_TYPES"]
