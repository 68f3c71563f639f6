"""Sampling functions of logits, against transformers' own logits processors as the oracle."""

import pytest
import torch

from moekit.inference.sampling import SamplingParams, process_logits, sample_token

lp = pytest.importorskip("transformers.generation.logits_process")

V = 50


def hf_process(logits, seen, p: SamplingParams):
    ids, x = seen[None], logits[None].clone()
    procs = [lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)] if p.repetition_penalty != 1 else []
    if not p.greedy:
        procs.append(lp.TemperatureLogitsWarper(p.temperature))
        if p.top_k is not None:
            procs.append(lp.TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            procs.append(lp.TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            procs.append(lp.MinPLogitsWarper(p.min_p))
    for proc in procs:
        x = proc(ids, x)
    return x[0]


@pytest.mark.parametrize("kw", [
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
])
def test_filters_match_transformers(kw):
    p = SamplingParams(**kw)
    for _ in range(5):
        logits = 3 * torch.randn(V)
        seen = torch.randint(0, V, (12,))
        got, want = process_logits(logits, p, seen), hf_process(logits, seen, p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])
        assert torch.isfinite(got).sum() >= 1


def test_filters_keep_what_they_promise():
    logits = torch.randn(V)
    probs = logits.softmax(-1)
    kept = torch.isfinite(process_logits(logits, SamplingParams(top_k=7), torch.zeros(0, dtype=torch.long)))
    assert kept.sum() == 7 and kept[logits.argmax()]
    kept = torch.isfinite(process_logits(logits, SamplingParams(top_p=0.5), torch.zeros(0, dtype=torch.long)))
    assert probs[kept].sum() >= 0.5 and probs[kept].sum() - probs[kept].min() < 0.5  # smallest such set


def test_seeded_draws_repeat_and_greedy_is_argmax():
    logits = torch.randn(V)
    p = SamplingParams(temperature=1.0)
    none = torch.zeros(0, dtype=torch.long)
    draws = lambda seed: [sample_token(logits, p, none, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(8)]
    assert draws(3) == draws(3)
    assert len({tuple(draws(s)) for s in range(5)}) > 1  # really sampling
    assert sample_token(logits, SamplingParams(temperature=0), torch.zeros(0, dtype=torch.long)) == int(logits.argmax())


@pytest.mark.parametrize("kw, field", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1), "temperature"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=0), "top_k"), (dict(min_p=1.0), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(stop=("",)), "stop"), (dict(seed=-2), "seed"),
])
def test_bad_parameters_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)
