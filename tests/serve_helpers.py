"""A tiny random MoE saved as a Hugging Face folder with a real tokenizer (byte-level BPE, a
Qwen2 chat template), loaded as ``moekit serve`` loads it, for the serve tests."""

from __future__ import annotations

from pathlib import Path

import hf_tokenizers as H
import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.inference.loading import load_for_inference
from moekit.model import MoETransformer
from moekit.serve.app import ServeState
from moekit.serve.cli import build_state

MODEL = "tiny-serve"
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"


def tiny_model(vocab_size: int, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=64, d_expert=64, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96, moe=moe)
    return MoETransformer(cfg).eval()


def model_folder(folder: Path) -> Path:
    """config.json + safetensors of a random tiny Mixtral-layout MoE, and a Qwen-like tokenizer."""
    H.qwen_like(folder, (TEMPLATES / "qwen2.jinja").read_text(encoding="utf-8"))
    from moekit.inference.tokenization import load_tokenizer

    tiny_model(load_tokenizer(folder).vocab_size).save_pretrained(folder, architecture="MixtralForCausalLM")
    return folder


def make_state(folder: Path, max_batch: int = 4, max_waiting: int = 16, api_key: str | None = None,
               fast_decode: bool = False) -> ServeState:
    model, tokenizer, defaults = load_for_inference(folder, dtype="fp32")
    return build_state(model, tokenizer, defaults, MODEL, max_batch, max_waiting, api_key=api_key,
                       fast_decode=fast_decode)
