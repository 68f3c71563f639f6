"""Training with a Hugging Face tokenizer that has no <|endoftext|> (Llama/Mistral ship </s> as
eos): documents are separated by the eos token of its tokenizer_config.json, the run folder
keeps that file, and the run reloads and resumes with the same separator."""

import json

import pytest

import hf_tokenizers
from moekit.data.tokenizer import load_tokenizer
from moekit.errors import UsageError
from moekit.training import resume_run, train
from moekit.training.run import load_run
from test_training import cache, corpus, quiet, tiny_model, tiny_train  # noqa: F401 (fixtures)


@pytest.mark.parametrize("build, separator", [(hf_tokenizers.llama_like, "</s>"),
                                              (hf_tokenizers.deepseek_like, "<｜end▁of▁sentence｜>"),
                                              (hf_tokenizers.qwen_like, "<|endoftext|>")])
def test_the_separator_is_endoftext_else_the_configured_eos(build, separator, tmp_path):
    tok = load_tokenizer(build(tmp_path / "tok") / "tokenizer.json")
    assert tok.eos_id == tok.backend.token_to_id(separator)


def test_bos_only_config_uses_bos_and_nothing_at_all_is_one_line(tmp_path):
    folder = hf_tokenizers.sentencepiece(tmp_path / "a", ["<unk>", "<s>", "</s>"])
    hf_tokenizers.write_config(folder, bos_token="<s>")
    tok = load_tokenizer(folder / "tokenizer.json")
    assert tok.eos_id == tok.backend.token_to_id("<s>")
    hf_tokenizers.write_config(folder, eos_token="<not-in-vocab>")
    with pytest.raises(UsageError, match="nothing can separate documents"):
        load_tokenizer(folder / "tokenizer.json")


def test_training_with_a_llama_tokenizer_separates_documents_by_eos(corpus, cache, tmp_path):
    folder = hf_tokenizers.llama_like(tmp_path / "tok")
    cfg = tiny_train(corpus, cache, max_steps=2, eval_every=2, ckpt_every=2)
    cfg.data.tokenizer = str(folder / "tokenizer.json")
    result = train(cfg, tiny_model(), tmp_path / "run", console=quiet(), stop_after=1)
    assert result.step == 1
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == "</s>"
    run = load_run(run_dir)
    eos = run.tokenizer.backend.token_to_id("</s>")
    assert run.tokenizer.eos_id == eos and run.model_cfg.vocab_size == run.tokenizer.vocab_size
    data = run.data()
    assert (data.train == eos).sum() > 1  # one separator per training document
    assert resume_run(run_dir, console=quiet()).step == 2
    from moekit.inference.tokenization import load_tokenizer as inference_tokenizer

    assert inference_tokenizer(run_dir).eos_ids == [eos]  # generation stops where documents ended
