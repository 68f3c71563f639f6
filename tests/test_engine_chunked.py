"""Chunked prefill: prompts prefilled a chunk per step give exactly the results of whole-prompt
prefill, for every attention kind, and running sequences keep decoding while a long prompt goes in."""

import pytest
import torch
from test_kv_cache import build

from moekit.inference.engine import Engine
from moekit.inference.sampling import SamplingParams


def _prompts(vocab: int, lengths) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["gqa_moe", "sliding_window_mixed", "mla_group_routing_shared"])
@pytest.mark.parametrize("chunk", [1, 4, 9])
def test_chunked_prefill_equals_whole_prompts(name, chunk):
    """Five prompts through 3 slots, greedy and seeded sampling: same tokens with any chunk size."""
    model = build(name).eval()
    prompts = _prompts(model.cfg.vocab_size, (23, 5, 11, 1, 17))
    params = [SamplingParams(max_new_tokens=6, temperature=t, seed=s) for t, s in
              [(0, None), (1.0, 3), (0, None), (0.8, 4), (0, None)]]
    whole = Engine(model, max_batch=3).generate(prompts, params)
    chunked = Engine(model, max_batch=3, prefill_chunk=chunk).generate(prompts, params)
    for w, c in zip(whole, chunked):
        assert c.output_ids == w.output_ids and c.finish_reason == w.finish_reason
    assert len({tuple(s.output_ids) for s in whole}) > 1  # not a degenerate model


def test_chunked_prefill_logits_equal_a_full_forward():
    """The last chunk's logits against the plain full forward of the whole prompt (fp32, 1e-5)."""
    model = build("mla_group_routing_shared").eval()
    prompt = _prompts(model.cfg.vocab_size, (19,))[0]
    engine = Engine(model, max_batch=1, prefill_chunk=5)
    seen = []
    orig = engine._advance
    engine._advance = lambda seqs, logits, routing: (seen.append(logits.clone()), orig(seqs, logits, routing))
    engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=0))
    with torch.inference_mode():
        want = model(torch.tensor([prompt])).logits[0, -1]
    assert len(seen) == 1 and engine.stats.prefill_tokens == 19
    torch.testing.assert_close(seen[0][0], want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_running_sequences_decode_while_a_long_prompt_is_prefilled():
    model = build("gqa_moe").eval()
    short, long = _prompts(model.cfg.vocab_size, (3, 40))
    engine = Engine(model, max_batch=2, prefill_chunk=8)
    a = engine.add(short, SamplingParams(max_new_tokens=20, temperature=0))
    engine.step()  # a prefilled, first token
    b = engine.add(long, SamplingParams(max_new_tokens=2, temperature=0))
    for step in range(5):  # 40 prompt tokens in chunks of 8: five steps, a decodes in each
        engine.step()
        assert len(a.output_ids) == 2 + step
        assert b._prefilled == 8 * (step + 1)
    assert b.output_ids and not b.prefilling
    alone = Engine(model, max_batch=1).generate([long], SamplingParams(max_new_tokens=2, temperature=0))[0]
    while not b.finished:
        engine.step()
    assert b.output_ids == alone.output_ids


def test_late_chunks_near_the_end_of_the_context_are_not_padded_past_it():
    """A row whose start + the step's widest chunk would pass the cache end runs on its own."""
    model = build("gqa_moe").eval()
    max_len = 30
    long, short = _prompts(model.cfg.vocab_size, (28, 12))
    params = SamplingParams(max_new_tokens=2, temperature=0)
    engine = Engine(model, max_batch=2, max_len=max_len, prefill_chunk=26)
    # step 1: long gets 26 tokens; step 2: long's last 2 (start 26) and short's 12 would pad long
    # to 26 + 12 > 30, so long goes alone.
    got = engine.generate([long, short], params)
    for p, g in zip([long, short], got):
        assert g.output_ids == Engine(model, max_batch=1, max_len=max_len).generate([p], params)[0].output_ids


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(build("gqa_moe"), prefill_chunk=0)
