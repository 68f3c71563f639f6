"""Model-folder tokenizers: encode/decode identical to transformers' AutoTokenizer on real
tokenizer folders (byte-level BPE, sentencepiece-style byte fallback), moekit run tokenizers,
special tokens, chat-template files, generation defaults, and the errors for broken folders."""

import json
from pathlib import Path

import hf_tokenizers as H
import pytest

from moekit.data.tokenizer import bytes_tokenizer, train_bpe
from moekit.errors import UsageError
from moekit.inference.generation_config import GenerationDefaults, load_generation_defaults
from moekit.inference.tokenization import load_tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
FOLDERS = {"qwen": H.qwen_like, "deepseek": H.deepseek_like, "llama": H.llama_like, "mixtral": H.mixtral_like}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: build(root / name) for name, build in FOLDERS.items()}


def auto(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", FOLDERS)
def test_encode_and_decode_match_transformers(folders, name):
    ours, theirs = load_tokenizer(folders[name]), auto(folders[name])
    for text in H.SAMPLES:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        specials = ids + [theirs.convert_tokens_to_ids(theirs.eos_token)] + ids[-3:]
        for skip in (True, False):
            assert ours.decode(specials, skip_special_tokens=skip) == theirs.decode(specials, skip_special_tokens=skip)
    assert ours.vocab_size == len(theirs)


@pytest.mark.parametrize("name", FOLDERS)
def test_bos_and_eos_are_the_folders(folders, name):
    ours, theirs = load_tokenizer(folders[name]), auto(folders[name])
    assert ours.bos_id == theirs.bos_token_id
    assert ours.eos_ids == [theirs.eos_token_id]
    # BOS comes first exactly when transformers puts it there (the post-processor decides).
    assert (ours.encode("the expert")[:1] == [ours.bos_id]) == (name in ("deepseek", "llama", "mixtral"))
    assert ours.bos_id not in ours.encode("the expert", add_special_tokens=False)


MORE_TEXT = H.SAMPLES + ["12345 and 6789.5", " x", "", "  two", "<s>[INST] hi [/INST] ok</s>", "a</s> naïve"]


def compare(folder, texts=MORE_TEXT):
    ours, theirs = load_tokenizer(folder), auto(folder)
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.special_tokens == theirs.special_tokens_map
    assert (ours.bos_id, ours.eos_ids) == (theirs.bos_token_id, [theirs.eos_token_id])
    return type(theirs).__name__


@pytest.mark.parametrize("model_type,legacy,add_prefix_space,cls", [
    ("mixtral", True, None, "TokenizersBackend"),  # Mistral family: the file as written
    ("llama", None, None, "LlamaTokenizer"),  # Llama 2: transformers rebuilds the pipeline
    ("llama", True, None, "LlamaTokenizer"),
    (None, None, False, "LlamaTokenizer"),
])
def test_sentencepiece_files_tokenize_as_transformers_class_does(tmp_path, model_type, legacy, add_prefix_space, cls):
    folder = H.mixtral_like(tmp_path)
    (folder / "config.json").unlink()
    if model_type:
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("legacy")
    config.update({k: v for k, v in (("legacy", legacy), ("add_prefix_space", add_prefix_space)) if v is not None})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert compare(folder) == cls


@pytest.mark.parametrize("model_type,declared,cls", [
    ("olmoe", "GPTNeoXTokenizer", "GPTNeoXTokenizer"),  # rebuilt: NFC, no BOS from the file
    ("deepseek_v3", "LlamaTokenizerFast", "TokenizersBackend"),  # byte-level file declared Llama
    ("qwen2", "PreTrainedTokenizerFast", "Qwen2Tokenizer"),  # class overridden by model type
    ("qwen3_moe", "Qwen2Tokenizer", "Qwen2Tokenizer"),
])
def test_byte_level_files_tokenize_as_transformers_class_does(tmp_path, model_type, declared, cls):
    folder = H.deepseek_like(tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = declared
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert compare(folder) == cls


def test_class_defaults_fill_unnamed_special_tokens(tmp_path):
    folder = H.qwen_like(tmp_path)  # no unk_token in its config: Qwen2Tokenizer's default applies
    (folder / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPTNeoXTokenizer"  # defaults include '<|padding|>', not in the vocabulary
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    compare(folder)
    assert load_tokenizer(folder).special_tokens["pad_token"] == "<|endoftext|>"  # the config's own wins
    assert load_tokenizer(folder).special_tokens["unk_token"] == "<|endoftext|>"


def test_add_bos_token_in_the_config_does_not_override_tokenizer_json(tmp_path):
    # transformers 5 reads BOS from tokenizer.json's post-processor when the file exists;
    # tokenizer_config.json's add_bos_token is then ignored. Same here.
    folder = H.qwen_like(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(bos_token="<|endoftext|>", add_bos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).encode("the") == auto(folder)("the")["input_ids"]


def test_special_tokens_missing_from_tokenizer_json_are_added_like_transformers(tmp_path):
    folder = H.qwen_like(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(bos_token="<|startoftext|>", additional_special_tokens=["<|tool|>"])
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = load_tokenizer(folder), auto(folder)
    assert ours.bos_id == theirs.bos_token_id and ours.bos_id is not None
    text = "<|startoftext|>the <|tool|> expert"
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True)


def test_chat_template_file_wins_over_tokenizer_config(tmp_path):
    folder = H.qwen_like(tmp_path, chat_template="{{ 'from the config' }}")
    assert load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "from the config"
    (folder / "chat_template.jinja").write_text("{{ 'from the file ' + messages[0]['content'] }}")
    msgs = [{"role": "user", "content": "hi"}]
    assert load_tokenizer(folder).apply_chat_template(msgs) == auto(folder).apply_chat_template(msgs, tokenize=False)
    assert load_tokenizer(folder).apply_chat_template(msgs) == "from the file hi"


def test_legacy_chat_template_json_is_read(tmp_path):
    folder = H.qwen_like(tmp_path)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages | length }} turns"}))
    tok = load_tokenizer(folder)
    assert tok.has_chat_template
    assert tok.apply_chat_template([{"role": "user", "content": "a"}] * 3) == "3 turns"


def test_no_chat_template_is_one_clear_error(folders):
    tok = load_tokenizer(folders["llama"])
    assert not tok.has_chat_template
    with pytest.raises(UsageError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_encode_chat_tokenizes_like_transformers(tmp_path):
    template = (TEMPLATES / "deepseek_v3.jinja").read_text(encoding="utf-8")
    folder = H.deepseek_like(tmp_path, chat_template=template)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which expert? 🙂"}]
    theirs = auto(folder).apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    tok = load_tokenizer(folder)
    assert tok.encode_chat(msgs) == list(theirs)
    assert tok.encode_chat(msgs).count(tok.bos_id) == 1  # the template's BOS, none added on top


# -- moekit run folders ---------------------------------------------------------------------

def run_folder(tmp_path, tokenizer):
    (tmp_path / "train_config.json").write_text("{}")  # what marks a run folder
    tokenizer.save(tmp_path / "tokenizer.json")
    return tmp_path


def test_run_folder_bpe_tokenizer_round_trips(tmp_path):
    run_tok = train_bpe([" ".join(H.WORDS)] * 20, vocab_size=300)
    tok = load_tokenizer(run_folder(tmp_path, run_tok))
    for text in H.SAMPLES:
        assert tok.encode(text) == run_tok.encode(text)  # no BOS: moekit runs train without one
        assert tok.decode(tok.encode(text)) == text
    assert tok.bos_id is None and tok.eos_ids == [run_tok.eos_id]
    assert tok.decode(run_tok.encode("the") + [run_tok.eos_id]) == "the"
    assert not tok.has_chat_template


def test_run_folder_bytes_tokenizer(tmp_path):
    tok = load_tokenizer(run_folder(tmp_path, bytes_tokenizer()))
    text = "naïve € 🙂"
    assert tok.encode(text) == list(text.encode()) and tok.vocab_size == 257
    assert tok.eos_ids == [256]
    assert tok.decode(tok.encode(text) + [256]) == text
    assert tok.decode(tok.encode(text) + [256], skip_special_tokens=False) == text + "<|endoftext|>"
    assert tok.decode(list("€".encode())[:2]) == "\ufffd"


# -- broken folders -------------------------------------------------------------------------

def test_missing_tokenizer_json_names_what_is_missing(tmp_path):
    with pytest.raises(UsageError, match=r"no tokenizer\.json in .*: the model folder needs its tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(UsageError, match=r"has tokenizer\.model \(sentencepiece\) but no tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UsageError, match="no such model folder"):
        load_tokenizer(tmp_path / "nope")


def test_broken_files_are_one_line_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UsageError) as e:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(e.value) and "\n" not in str(e.value)
    folder = H.qwen_like(tmp_path / "q")
    (folder / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="does not hold a JSON object"):
        load_tokenizer(folder)


# -- generation defaults ---------------------------------------------------------------------

def test_generation_defaults_merge_the_folders_stop_ids(folders, tmp_path):
    folder = folders["qwen"]
    tok = load_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [0, 2], "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
         "bos_token_id": 0, "pad_token_id": 0}))
    try:
        d = load_generation_defaults(folder)
    finally:
        (folder / "generation_config.json").unlink()
    assert d.eos_ids == [0, 2] and tok.eos_ids == [2]
    assert (d.do_sample, d.temperature, d.top_p, d.top_k, d.pad_id) == (True, 0.6, 0.95, 20, 0)
    assert d.source.endswith("generation_config.json")


def test_generation_defaults_without_the_file_are_transformers_defaults(folders, tmp_path):
    d = load_generation_defaults(folders["llama"])
    assert d == GenerationDefaults(eos_ids=[2], bos_id=1)
    assert (d.do_sample, d.temperature, d.top_k, d.top_p) == (False, 1.0, 50, 1.0)
    # no generation_config.json: config.json's token ids, as transformers falls back to them
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "eos_token_id": 7}))
    assert load_generation_defaults(tmp_path).eos_ids == [7]


def test_bad_generation_config_names_the_file_and_field(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(UsageError, match=r"generation_config\.json: top_p must be in \(0, 1\], got 1\.5"):
        load_generation_defaults(tmp_path)


def test_run_folder_without_its_tokenizer(tmp_path):
    (tmp_path / "train_config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"no tokenizer\.json in the run folder"):
        load_tokenizer(tmp_path)


def test_wordpiece_clean_up_spaces_like_transformers(tmp_path):
    # clean_up_tokenization_spaces applies to non-BPE models only (transformers refuses it for BPE).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    tok.train_from_iterator([" ".join(H.WORDS) + " isn't it , ok ? yes ! ."] * 20,
                            trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    H.write_config(tmp_path, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    text = "the router, isn't it? yes! ok."
    ours, theirs = load_tokenizer(tmp_path), auto(tmp_path)
    assert ours.encode(text) == theirs(text)["input_ids"]
    ids = ours.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == "the router, isn't it? yes! ok."
