"""Streamed text and stop strings (serve/text.py), and the scheduler's sampling rule."""

from __future__ import annotations

import pytest
import torch

from moekit.serve.scheduler import SamplingParams, sample_token
from moekit.serve.text import TextStream


class CharDetok:
    """One character per token id (id = code point): the stop logic seen without a tokenizer."""

    def push(self, token_id):
        return chr(token_id)

    def flush(self):
        return ""


def run(text: str, stops) -> tuple[list[str], bool]:
    s = TextStream(CharDetok(), stops)
    pieces = []
    for ch in text:
        pieces.append(s.push(ord(ch)))
        if s.stopped:
            break
    else:
        pieces.append(s.finish())
    return pieces, s.stopped


@pytest.mark.parametrize("text, stops, expect, stopped", [
    ("hello world", ["wor"], "hello ", True),
    ("hello world", ["xyz", "lo w", "o"], "hell", True),  # the earliest stop wins
    ("hello world", ["wx"], "hello world", False),  # a partial match is released once it fails
    ("aab", ["ab"], "a", True),  # overlapping prefix: "a" held, then "aa" -> release one "a"
    ("hello", ["lo!"], "hello", False),  # held at the end, released by finish()
])
def test_stop_strings_cut_exactly_and_pieces_add_up(text, stops, expect, stopped):
    pieces, did_stop = run(text, stops)
    assert "".join(pieces) == expect and did_stop == stopped


def test_text_that_could_start_a_stop_string_is_held_back():
    pieces, _ = run("say END now", ["ENDX"])
    assert pieces[4:7] == ["", "", ""]  # "E", "EN", "END" wait for the next character
    assert pieces[7] == "END "


def test_sampling_greedy_top_k_top_p():
    logits = torch.randn(50)
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, SamplingParams(max_tokens=1, temperature=0), g) == int(logits.argmax())
    top3 = set(torch.topk(logits, 3).indices.tolist())
    assert {sample_token(logits, SamplingParams(1, temperature=2.0, top_k=3), g) for _ in range(200)} <= top3
    # top_p just below the top token's mass: only the top token remains
    probs = torch.softmax(logits, -1)
    p = SamplingParams(1, temperature=1.0, top_p=float(probs.max()) * 0.99)
    assert {sample_token(logits, p, g) for _ in range(50)} == {int(logits.argmax())}
    a = [sample_token(logits, SamplingParams(1), torch.Generator().manual_seed(3)) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw


@pytest.mark.parametrize("field, kw", [("max_tokens", {"max_tokens": 0}), ("temperature", {"temperature": -1}),
                                       ("top_p", {"top_p": 0}), ("top_k", {"top_k": 0})])
def test_sampling_params_name_the_bad_field(field, kw):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{"max_tokens": 4, **kw})
