"""Streaming detokenization: the pieces add up to the full decode for any id sequence, on
byte-level BPE, sentencepiece-style byte fallback and moekit's raw bytes; multi-byte characters
split across tokens appear once complete; transformers' decode agrees."""

import hf_tokenizers as H
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.data.tokenizer import bytes_tokenizer
from moekit.inference.detokenize import IncrementalDetokenizer, stream_text
from moekit.inference.tokenization import load_tokenizer

FOLDERS = {"byte_level": H.qwen_like, "bos_byte_level": H.deepseek_like, "byte_fallback": H.llama_like}
TEXT = st.text(alphabet=st.sampled_from(list("the expert router naïve€日本語🙂🧪 \n\tß")), max_size=40)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("detok")
    out = {name: load_tokenizer(build(root / name)) for name, build in FOLDERS.items()}
    run = root / "bytes_run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    bytes_tokenizer().save(run / "tokenizer.json")
    out["bytes"] = load_tokenizer(run)
    return out


def pieces(tok, ids, prompt=()):
    detok = IncrementalDetokenizer(tok, prompt)
    return [detok.push(i) for i in ids] + [detok.flush()]


NAMES = [*FOLDERS, "bytes"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(data=st.data())
def test_random_ids_stream_to_the_full_decode(toks, name, data):
    # Arbitrary ids: invalid byte runs, special tokens, lone '▁' pieces, anything a sampler emits.
    tok = toks[name]
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    assert "".join(pieces(tok, ids)) == tok.decode(ids)
    assert "".join(pieces(tok, ids)) == "".join(stream_text(tok, ids))


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(prompt=TEXT, reply=TEXT)
def test_text_streams_as_the_continuation_of_the_prompt(toks, name, prompt, reply):
    tok = toks[name]
    prompt_ids, ids = tok.encode(prompt), tok.encode(reply, add_special_tokens=False)
    got = pieces(tok, ids, prompt_ids)
    assert "".join(got) == tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)):]
    assert all("\ufffd" not in p for p in got)  # valid text never shows half a character


@pytest.mark.parametrize("name", NAMES)
def test_multibyte_characters_wait_for_their_last_byte(toks, name):
    tok = toks[name]
    ids = tok.encode("€🙂 ok", add_special_tokens=False)
    got = pieces(tok, ids)
    assert "".join(got) == "€🙂 ok"
    assert all("\ufffd" not in p for p in got)
    if name in ("bytes", "byte_fallback"):
        assert got[0] == ""  # the first byte alone is not a character


def test_sentencepiece_leading_space_is_kept_after_a_prompt(toks):
    tok = toks["byte_fallback"]
    prompt = tok.encode("the router")
    ids = tok.encode("the router learns", add_special_tokens=False)[len(tok.encode("the router", False)):]
    assert tok.token_text(ids[0]).startswith("▁")
    assert "".join(pieces(tok, ids, prompt)) == " learns"
    assert "".join(pieces(tok, ids)) == "learns"  # alone, as decode(ids) gives it


def test_special_tokens_are_skipped_or_kept(toks):
    tok = toks["bos_byte_level"]
    ids = [tok.bos_id] + tok.encode("the expert", add_special_tokens=False) + tok.eos_ids
    assert "".join(pieces(tok, ids)) == "the expert"
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    kept = "".join([detok.push(i) for i in ids] + [detok.flush()])
    assert kept == tok.decode(ids, skip_special_tokens=False) == tok.bos_token + "the expert" + tok.eos_token


def test_transformers_decode_agrees(toks, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = H.llama_like(tmp_path)
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in H.SAMPLES:
        ids = ours.encode(text)
        assert "".join(pieces(ours, ids)) == theirs.decode(ids, skip_special_tokens=True)
