"""moekit.meta: models built on the meta device without initializers, then allocated for real."""

import subprocess
import sys

import torch

from moekit import MoEConfig, ModelConfig, MoETransformer
from moekit.meta import materialize, on_meta


def small(shared: int = 1) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                       moe=MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2, num_shared_experts=shared))


def test_on_meta_builds_the_structure_and_leaves_real_tensors_alone():
    with on_meta():
        meta = MoETransformer(small())
        real = torch.zeros(8, device="cpu")
        torch.nn.init.normal_(real)  # only meta tensors skip their initializer
    assert all(t.is_meta for t in meta.state_dict().values())
    assert real.abs().sum() > 0
    ref = MoETransformer(small())
    assert {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in ref.state_dict().items()}


def test_materialize_allocates_every_tensor_and_zeroes_the_buffers():
    with on_meta():
        model = MoETransformer(small())
    model = model.to(torch.bfloat16)
    model.blocks[0].ffn.router.float()
    materialize(model, "cpu")
    ref = MoETransformer(small())
    assert not any(t.is_meta for t in model.state_dict().values())
    assert list(model.state_dict()) == list(ref.state_dict())  # persistent buffers stay persistent
    assert all(p.requires_grad for p in model.parameters())
    assert all(float(b.abs().sum()) == 0 for b in model.buffers())
    assert model.blocks[1].ffn.experts.w_in.dtype == torch.bfloat16
    assert model.blocks[0].ffn.router.weight.dtype == torch.float32
    with on_meta():
        twin = MoETransformer(small())
    materialize(twin, "cpu").load_state_dict(ref.state_dict())  # and then it is an ordinary model
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(twin(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_from_pretrained_does_not_import_the_compiler_stack(tmp_path):
    # torch._dynamo and sympy stay resident once imported (~100 MiB): building on meta with
    # initializers, or Module.to_empty, would import them (see moekit.meta's docstring).
    MoETransformer(small(shared=0)).save_pretrained(tmp_path, architecture="MixtralForCausalLM")
    code = ("import sys, moekit; m = moekit.from_pretrained(sys.argv[1]); m(__import__('torch').tensor([[1, 2]])); "
            "print(sorted(n for n in ('sympy', 'torch._dynamo') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
