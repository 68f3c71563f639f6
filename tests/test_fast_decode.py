"""Fast decode (inference/fast_decode.py): the small-M matmul equals F.linear; an engine with it
gives the plain engine's greedy tokens (fp32) and close logits (bf16) on dense, MoE with shared
experts and GQA models; prefill and training forwards stay the model's own; unsupported
devices and dtypes fail with one clear error; the kernel's package is built once and reused from
disk. The kernel takes every size, so these tiny models exercise it."""

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.errors import UsageError
from moekit.inference import fast_decode
from moekit.inference.engine import Engine
from moekit.inference.sampling import SamplingParams
from moekit.layers.experts import Experts



# bf16 keeps 8 mantissa bits: outputs of O(1) agree to a few ulps (sum order, one rounding)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(37, 19), (64, 48), (5, 130), (1, 33), (2, 2), (3000, 7)])
def test_small_linear_equals_f_linear(dtype, N, K):
    """Every M the decode path takes (1: the compiled kernel, one package for every shape, or
    F.linear for a one-row weight; 2-4: mm(w, x.T).T in fp32; more: F.linear), odd sizes
    included, against F.linear in float64."""
    w = torch.randn(N, K, dtype=dtype)
    for M in range(1, fast_decode.MAX_ROWS + 1):
        x = torch.randn(M, K, dtype=dtype)
        with torch.inference_mode():
            got = fast_decode.small_linear(x, w)
        want = F.linear(x.double(), w.double())
        assert got.shape == (M, N) and got.dtype == dtype and got.is_contiguous()
        scale = want.abs().max()
        assert ((got.double() - want).abs().max() / scale).item() <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_the_kernel_is_built_once_and_then_loaded_from_disk(monkeypatch, tmp_path):
    """A damaged package on disk (a crash, another torch) is rebuilt, whole under its final name
    (temp + rename), saying so once; a process that then finds it loads it without compiling."""
    from torch._inductor.runtime import cache_dir_utils

    dtype = torch.float32
    monkeypatch.setattr(cache_dir_utils, "cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(fast_decode, "_runners", {})
    path = fast_decode.kernel_path(dtype, torch.get_num_threads())
    assert path.parent == tmp_path / "moekit"
    path.parent.mkdir()
    path.write_bytes(b"not a package")
    lines: list[str] = []
    fast_decode.compile_check(dtype, lines.append)
    assert len(lines) == 1 and "compiling its float32 kernel" in lines[0] and path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left

    def no_build(*a):
        raise AssertionError("rebuilt a package that was on disk")
    monkeypatch.setattr(fast_decode, "_runners", {})  # a new process, as far as the kernel goes
    monkeypatch.setattr(fast_decode, "_build", no_build)
    x, w = torch.randn(1, 50), torch.randn(70, 50)
    with torch.inference_mode():
        torch.testing.assert_close(fast_decode.small_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    # Another thread count is another kernel (its OpenMP loop is built for it): another file.
    assert len({fast_decode.kernel_path(dtype, 1), fast_decode.kernel_path(dtype, 3),
                fast_decode.kernel_path(torch.bfloat16, 1)}) == 3


def model(dense: bool = False, shared: int = 0, kv_heads: int = 2, dtype=torch.float32) -> moekit.MoETransformer:
    """A tiny model: all-dense, or MoE every other layer (with ``shared`` shared experts)."""
    moe = moekit.MoEConfig(d_model=32, d_expert=24, num_experts=4, top_k=2, num_shared_experts=shared)
    cfg = moekit.ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, d_ff=40,
                             max_seq_len=64, init_std=0.3, moe_every=2, moe=None if dense else moe)
    torch.manual_seed(0)
    return moekit.MoETransformer(cfg).to(dtype).eval()


MODELS = {"dense": dict(dense=True), "moe_shared_gqa": dict(shared=1, kv_heads=2), "moe_mha": dict(kv_heads=4)}


def _prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in (7, 3, 11, 5)[:batch]]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch", [1, 3])
def test_engine_fast_decode_is_token_identical_in_fp32(name, batch):
    """Greedy continuations with and without fast decode: batch 1 (single-token experts,
    compiled GEMVs) and batch 3 (the experts' few-row decode path, mm(w, x.T).T)."""
    m = model(**MODELS[name])
    params = SamplingParams(max_new_tokens=10, temperature=0)
    plain = Engine(m, max_batch=batch).generate(_prompts(batch), params)
    fast = Engine(m, max_batch=batch, fast_decode=True).generate(_prompts(batch), params)
    assert [s.output_ids for s in fast] == [s.output_ids for s in plain]
    fast_decode.remove(m)


def _decode_logits(m, fast: bool) -> torch.Tensor:
    """Logits of 4 decode steps after a 6-token prompt, through the engine's own forwards."""
    e = Engine(m, max_batch=1, fast_decode=fast)
    logits = []
    forward = m.forward

    def spy(*a, **k):
        out = forward(*a, **k)
        logits.append(out.logits.float())
        return out
    m.forward = spy
    try:
        e.generate([_prompts(1)[0][:6]], SamplingParams(max_new_tokens=5, temperature=0))
    finally:
        del m.forward
    return torch.cat([x[:, -1] for x in logits[1:]])  # the decode steps: [4, V]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_fast_decode_logits_close(dtype):
    m = model(shared=1, dtype=dtype)
    plain, fast = _decode_logits(m, False), _decode_logits(m, True)
    assert plain.shape == fast.shape == (4, 97)
    torch.testing.assert_close(fast, plain, **TOL[dtype])
    fast_decode.remove(m)


def test_outside_decode_steps_the_model_is_untouched():
    """Installed but not decoding: prefill, training forward and gradients are bit-identical
    to the model's own, and the experts' hook is unset; remove() restores the forwards."""
    m = model(shared=1)
    ids = torch.randint(0, 97, (2, 5))
    want = m(ids).logits
    fd = fast_decode.install(m)
    assert fast_decode.install(m) is fd  # one installation per model
    m.train()
    out = m(ids).logits
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    fast_decode.remove(m)
    assert torch.equal(out, want)
    m(ids).logits.square().sum().backward()
    for n, p in m.named_parameters():
        if n in grads:
            assert torch.equal(p.grad, grads[n]), n
    assert all(e.decode_linear is None for e in m.modules() if isinstance(e, Experts))
    assert all("forward" not in mod.__dict__ for mod in m.modules())


def test_decoding_engages_only_without_grad_and_for_few_rows():
    m = model()
    fd = fast_decode.install(m)
    x1, x9 = torch.randn(1, 1, 32), torch.randn(1, 9, 32)
    with torch.no_grad(), fd.decoding():
        assert fd.engaged(x1) and not fd.engaged(x9)
        with torch.enable_grad():
            assert not fd.engaged(x1)
    assert not fd.engaged(x1)
    fast_decode.remove(m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_unsupported_dtype_is_one_clear_error(dtype):
    with pytest.raises(UsageError, match="fast decode runs on CPU in fp32 or bf16"):
        Engine(model(dtype=dtype), fast_decode=True)


def test_unsupported_device_is_one_clear_error():
    with pytest.raises(UsageError, match="on cuda"):
        fast_decode.check_supported(torch.device("cuda"), torch.float32)


def test_generate_cli_with_fast_decode_prints_the_plain_text(tmp_path, capsys):
    """`moekit generate --fast-decode` (fp32) streams the same greedy text as without it, and
    --dtype fp16 with it is one line, exit status 2."""
    from hf_tokenizers import qwen_like

    from moekit.cli import main
    from moekit.inference.tokenization import load_tokenizer

    qwen_like(tmp_path)
    cfg = moekit.ModelConfig(vocab_size=load_tokenizer(tmp_path).vocab_size, d_model=32, n_layers=2, n_heads=4,
                             n_kv_heads=2, d_ff=40, max_seq_len=128, init_std=0.3,
                             moe=moekit.MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2))
    torch.manual_seed(0)
    moekit.MoETransformer(cfg).save_pretrained(tmp_path, architecture="MixtralForCausalLM")
    args = ["generate", str(tmp_path), "--prompt", "the router learns", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--fast-decode"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--fast-decode", "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "fast decode runs on CPU in fp32 or bf16" in err and len(err.strip().splitlines()) == 1


def test_server_with_fast_decode_answers_as_the_plain_server(tmp_path, monkeypatch):
    """`moekit serve --fast-decode`: concurrent greedy requests through a real server on
    127.0.0.1 (the official client) give the plain server's texts, fp32, steps of 1-4 rows."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from moekit.serve.server import BackgroundServer
    from serve_helpers import MODEL, make_state, model_folder

    folder = model_folder(tmp_path / "tiny-serve")
    calls = []
    small_linear = fast_decode.small_linear
    monkeypatch.setattr(fast_decode, "small_linear", lambda x, w: calls.append(len(x)) or small_linear(x, w))
    prompts = [("The quick", 12), ("Experts route tokens; routers", 5), ("café", 9), ("Mixture of", 7)]

    def answers(fast: bool) -> list[str]:
        state = make_state(folder, max_batch=4, fast_decode=fast)
        with BackgroundServer(state) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            with ThreadPoolExecutor(len(prompts)) as pool:
                return list(pool.map(lambda p: c.completions.create(
                    model=MODEL, prompt=p[0], max_tokens=p[1], temperature=0).choices[0].text, prompts))

    plain = answers(False)
    assert not calls
    fast = answers(True)
    assert all(plain) and fast == plain
    assert 1 in calls and max(calls) > 1, calls  # the kernel and the few-row path both ran
