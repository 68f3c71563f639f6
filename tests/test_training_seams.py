"""The trainer as a seam: a given model, a custom loss and a parameter filter plug into the
one loop; the defaults are plain pre-training, step for step."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moekit import MoETransformer
from moekit.errors import UsageError
from moekit.model import LossParts
from moekit.training import train
from test_training import cache, corpus, quiet, tiny_model, tiny_train, train_losses  # noqa: F401 (fixtures)


def short(corpus, cache, **kw):
    return tiny_train(corpus, cache, max_steps=6, eval_every=3, ckpt_every=6, **kw)


def test_a_given_model_trains_exactly_as_its_config_would(corpus, cache, tmp_path):
    # no router noise: train seeds the RNG once more after taking a given model
    cfg, model_cfg = short(corpus, cache), tiny_model(router="softmax", router_jitter=0.0)
    train(cfg, model_cfg, tmp_path / "from_config", console=quiet())
    torch.manual_seed(cfg.seed)  # what train does before building a model from its config
    model = MoETransformer(model_cfg)  # vocab 257 = the bytes tokenizer's
    train(cfg, model, tmp_path / "given", console=quiet())
    assert train_losses(tmp_path / "given") == train_losses(tmp_path / "from_config")


def test_a_parameter_filter_leaves_the_rest_bit_identical(corpus, cache, tmp_path):
    model = MoETransformer(tiny_model())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(short(corpus, cache), model, tmp_path / "r", console=quiet(),
                   param_filter=lambda name, p: ".experts." in name)
    assert result.step == 6
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if ".experts." in k} == {k for k in before if ".experts." in k}
    # everything else is frozen, except the balancing bias: a buffer moved by the loop itself
    assert {k for k in changed if ".experts." not in k} == {f"blocks.{i}.ffn.router.expert_bias" for i in (0, 1)}


def test_a_custom_loss_is_what_gets_minimized(corpus, cache, tmp_path):
    """Distillation as a caller: match a frozen teacher's next-token distribution."""
    teacher = MoETransformer(tiny_model()).eval().requires_grad_(False)
    shapes = []

    def distill(out, batch):
        shapes.append(tuple(batch.shape))
        with torch.no_grad():
            target = F.log_softmax(teacher(batch[:, :-1]).logits.float(), -1)
        kl = F.kl_div(F.log_softmax(out.logits.float(), -1), target, log_target=True, reduction="batchmean")
        return LossParts(total=kl + out.aux_loss, lm=kl, aux=out.aux_loss)

    cfg = dataclasses.replace(short(corpus, cache), max_steps=8, warmup_steps=2)
    train(cfg, tiny_model(), tmp_path / "r", console=quiet(), loss_fn=distill)
    assert shapes == [(4, 33)] * (8 * 2)  # every micro-batch, whole (inputs and targets)
    losses = train_losses(tmp_path / "r")
    assert losses[-1] < 0.5 * losses[0]


def test_a_given_model_must_fit_the_tokenizer(corpus, cache, tmp_path):
    small = MoETransformer(dataclasses.replace(tiny_model(), vocab_size=100))
    with pytest.raises(UsageError, match="tokenizer has 257 tokens but the model's vocabulary only 100"):
        train(short(corpus, cache), small, tmp_path / "r", console=quiet())
