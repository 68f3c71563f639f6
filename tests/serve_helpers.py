"""A tiny random MoE and a real BPE tokenizer behind a live server on 127.0.0.1 (serve tests)."""

from __future__ import annotations

import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.data.tokenizer import train_bpe
from moekit.model import MoETransformer
from moekit.serve.app import ServeState
from moekit.serve.backend import RecomputeBackend
from moekit.serve.scheduler import Scheduler
from moekit.serve.text import DiffDetokenizer

MODEL = "tiny-serve"
TEXT = ["The quick brown fox jumps over the lazy dog. Experts route tokens; routers pick experts.",
        "Mixture of experts models activate a few experts per token, décor café naïve 東京."] * 4


class _Tok:
    def __init__(self, tok):
        self.tok, self.eos_ids = tok, {tok.eos_id}

    def encode(self, text):
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


def tiny_model(vocab_size: int, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=64, d_expert=64, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96, moe=moe)
    return MoETransformer(cfg).eval()


def make_state(max_batch: int = 4, max_waiting: int = 16, api_key: str | None = None) -> ServeState:
    tok = _Tok(train_bpe(TEXT, vocab_size=300))
    model = tiny_model(tok.tok.vocab_size)
    scheduler = Scheduler(RecomputeBackend(model, max_batch), max_waiting=max_waiting)

    def chat_prompt(messages):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return tok.encode(text)

    return ServeState(scheduler, tok, MODEL, model.cfg.vocab_size, lambda _prompt: DiffDetokenizer(tok.decode),
                      stop_ids=frozenset(tok.eos_ids), chat_prompt=chat_prompt, api_key=api_key)
