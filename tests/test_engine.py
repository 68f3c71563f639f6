"""The generation engine: greedy text identical to transformers' generate for every family,
batches equal to one-at-a-time, seeded sampling reproducible, stop strings cut exactly,
streaming pieces adding up to the text, and the routing record."""

import pytest
import torch
from hf_tiny import BUILDERS, VOCAB, build

import moekit
from moekit.inference.engine import Engine
from moekit.inference.tokenization import ByteBackend, TextTokenizer
from moekit.inference.sampling import SamplingParams

pytest.importorskip("transformers")

NEW = 12
GREEDY = SamplingParams(max_new_tokens=NEW, temperature=0)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_greedy_equals_transformers_generate(arch, tmp_path):
    """Two prompts of different lengths batched together, each against transformers' own
    cached generate on that prompt alone."""
    ref = build(arch)
    ref.save_pretrained(tmp_path)
    model = moekit.from_pretrained(tmp_path)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (17, 6)]
    got = Engine(model, max_batch=2).generate(prompts, GREEDY)
    for p, seq in zip(prompts, got):
        ids = torch.tensor([p])
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                            eos_token_id=None, pad_token_id=VOCAB - 1)[0, len(p):]
        assert seq.output_ids == want.tolist()
        assert seq.finish_reason == "length"


def native(vocab=VOCAB, **kw) -> moekit.MoETransformer:
    cfg = moekit.ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40,
                             max_seq_len=64, init_std=0.3, moe_every=2,
                             moe=moekit.MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2), **kw)
    return moekit.MoETransformer(cfg).eval()


def test_batch_equals_one_at_a_time_with_sequences_finishing_apart():
    """Five prompts through 3 slots (a queue, slots reused), mixed greedy and seeded sampling,
    different lengths, max_new_tokens and a stop token: each result is the prompt's result alone."""
    model = native()
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (9, 3, 15, 1, 6)]
    params = [SamplingParams(max_new_tokens=n, temperature=t, top_k=k, seed=s)
              for n, t, k, s in [(10, 0, None, None), (4, 1.0, None, 1), (7, 0.8, 20, 2), (12, 0, None, None), (9, 1.2, 8, 5)]]
    alone = [Engine(model, max_batch=1).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    stop_tok = alone[3].output_ids[5]  # the greedy one stops early on a token it would produce
    params[3].stop_token_ids = (stop_tok,)
    alone[3] = Engine(model, max_batch=1).generate([prompts[3]], params[3])[0]
    batched = Engine(model, max_batch=3).generate(prompts, params)
    for a, b in zip(alone, batched):
        assert b.output_ids == a.output_ids and b.finish_reason == a.finish_reason
    assert alone[3].finish_reason == "stop" and alone[3].output_ids[-1] == stop_tok
    assert [len(s.output_ids) for s in batched] != [len(batched[0].output_ids)] * 5


def test_seeded_sampling_is_reproducible():
    model, prompt = native(), torch.randint(0, VOCAB, (5,)).tolist()
    run = lambda seed: Engine(model).generate([prompt], SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed))[0]
    assert run(7).output_ids == run(7).output_ids
    assert len({tuple(run(s).output_ids) for s in range(4)}) > 1


def test_context_limit_finishes_with_length():
    model = native()
    seq = Engine(model, max_len=20).generate([torch.randint(0, VOCAB, (15,)).tolist()],
                                             SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert seq.finish_reason == "length" and len(seq.output_ids) == 20 - 15 + 1  # the last one needs no slot
    with pytest.raises(ValueError, match="context holds 20"):
        Engine(model, max_len=20).add(list(range(21)))


def bytes_engine(**kw):
    tok = TextTokenizer(ByteBackend(), {"eos_token": ByteBackend.EOS})  # a raw-bytes run's tokenizer
    return Engine(native(vocab=tok.vocab_size), tok, **kw), tok


def test_stop_strings_cut_exactly_and_streaming_adds_up():
    engine, tok = bytes_engine()
    prompt = tok.encode("The cat")
    free = engine.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0))[0]
    assert len(free.text) > 12
    for stop in (free.text[5:8], free.text[9:10], free.text[3:7] + "\x00never"):
        want = free.text[: free.text.find(stop)] if stop in free.text else free.text
        params = SamplingParams(max_new_tokens=40, temperature=0, stop=(stop, "zzzz\x01"))
        pieces = list(engine.stream(prompt, params))
        assert "".join(pieces) == want
        assert all(stop not in p for p in pieces)
        seq = engine.generate([prompt], params)[0]
        assert seq.text == want
        assert seq.finish_reason == ("stop" if stop in free.text else "length")


def test_streaming_matches_the_batch_text_and_multibyte_characters_arrive_whole():
    engine, tok = bytes_engine()
    prompt = tok.encode("héllo wörld €")
    seq = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=1.0, seed=4))[0]
    pieces = list(engine.stream(prompt, SamplingParams(max_new_tokens=30, temperature=1.0, seed=4)))
    assert "".join(pieces) == seq.text == tok.decode(seq.output_ids)
    detok = tok.detokenizer(prompt)
    euro = "€".encode()
    assert [detok.push(b) for b in euro] == ["", "", "€"]


def test_routing_record_is_the_full_forwards_choice():
    """Generated token i was predicted at position P+i-1; the experts recorded for it are those
    the router picks at that position when the whole sequence is run at once."""
    model = native()
    prompt = torch.randint(0, VOCAB, (7,)).tolist()
    engine = Engine(model, record_routing=True)
    seq = engine.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0))[0]
    full = torch.tensor([prompt + seq.output_ids[:-1]])
    seen = []
    hook = model.moe_layers()[0].router.register_forward_hook(lambda m, i, out: seen.append(out.ids) and None)
    with torch.no_grad():
        model(full)
    hook.remove()
    want = seen[0][len(prompt) - 1:].tolist()  # [6, K]
    assert [r[0] for r in seq.routing] == want
    assert len(seq.routing[0]) == len(model.moe_layers()) == 1


def test_cancel_frees_the_slot():
    model = native()
    engine = Engine(model, max_batch=1)
    a = engine.add([1, 2, 3], SamplingParams(max_new_tokens=50, temperature=0))
    b = engine.add([4, 5], SamplingParams(max_new_tokens=3, temperature=0))
    engine.step()
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and engine.free_slots == [0]
    while engine.has_work():
        engine.step()
    assert b.finish_reason == "length" and len(b.output_ids) == 3
