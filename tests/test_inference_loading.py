"""load_for_inference: a moekit run folder or a Hugging Face folder -> model, tokenizer and
generation defaults; a folder that is neither, or lacks its tokenizer, is one line naming it."""

import json
import shutil

import hf_tokenizers as H
import pytest
import torch
from hf_tiny import build

from moekit import MoEConfig, ModelConfig, MoETransformer
from moekit.data import DataConfig
from moekit.data.tokenizer import bytes_tokenizer
from moekit.errors import UsageError
from moekit.inference.loading import load_for_inference, parse_dtype
from moekit.interop.checkpoint import Checkpoint
from moekit.training import TrainConfig
from moekit.training.checkpoint import save_checkpoint
from moekit.training.run import write_run_files

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as moekit train writes it (configs, tokenizer, a verified checkpoint), with
    random weights: loading is under test here, not training."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    model_cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=32,
                            moe=MoEConfig(d_model=32, d_expert=32, num_experts=4, top_k=2))
    write_run_files(folder, TrainConfig(data=DataConfig(tokenizer="bytes"), seq_len=32), model_cfg,
                    bytes_tokenizer())
    save_checkpoint(folder, MoETransformer(model_cfg), {"step": 3})
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixtral")
    build("mixtral").save_pretrained(folder)
    H.llama_like(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5], "temperature": 0.7,
                                                               "do_sample": True}))
    return folder


def test_run_folder(run_dir):
    model, tok, defaults = load_for_inference(run_dir)
    assert not model.training
    ids = tok.encode("def f():")
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 257)
    assert tok.eos_ids == [256] and defaults.eos_ids == [256] and defaults.source is None
    model16, _, _ = load_for_inference(run_dir, dtype="bf16")
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_hf_folder(hf_dir):
    model, tok, defaults = load_for_inference(hf_dir, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tok.bos_id == 1 and tok.encode("the")[0] == 1
    assert defaults.eos_ids == [2, 5] and defaults.temperature == 0.7 and defaults.do_sample


def test_hf_folder_without_tokenizer_names_the_file(hf_dir, tmp_path, monkeypatch):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, tmp_path / name)

    def refuse(self, name):
        raise AssertionError(f"tensor {name} was read before the tokenizer was checked")

    monkeypatch.setattr(Checkpoint, "get", refuse)  # the error comes before any weight is read
    with pytest.raises(UsageError, match=rf"no tokenizer\.json in {tmp_path}"):
        load_for_inference(tmp_path)


def test_unknown_folders_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="no such model folder"):
        load_for_inference(tmp_path / "missing")
    with pytest.raises(UsageError, match="neither a moekit run folder .* nor a Hugging Face model folder"):
        load_for_inference(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 8}))  # a moekit ModelConfig, not HF
    with pytest.raises(UsageError, match="neither"):
        load_for_inference(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        load_for_inference(tmp_path / "f.txt")
    with pytest.raises(UsageError, match="unknown dtype 'fp8'"):
        parse_dtype("fp8")


def test_unsupported_hf_architecture_is_a_usage_error(hf_dir, tmp_path):
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, tmp_path / name)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="GPT2LMHeadModel"):
        load_for_inference(tmp_path)
