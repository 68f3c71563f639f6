"""Benchmark one MoE layer against the dense FFN of the same active size and against transformers.

Shape legend: T tokens, D model dim, F expert hidden width, E experts, K experts per token.

For every (shape, dtype, mode) the candidates are built once, warmed up, then timed
interleaved (candidate 1, 2, ..., 1, 2, ...) so that drift in machine load hits them alike;
the figure is the median over repeats. Candidates:
- ``moekit``: ``MoELayer`` with ``impl="auto"`` (grouped for many tokens, decode for few);
  ``moekit[loop]`` optionally, the reference per-expert loop;
- ``dense``: a fused SwiGLU FFN with the active width d_ff = K * F (+ shared width), the floor
  that a sparse layer cannot beat by much;
- ``hf[<impl>]``: transformers' ``MixtralSparseMoeBlock`` (``Qwen2MoeSparseMoeBlock`` with
  shared experts) for each CPU experts implementation, when transformers is importable.

Memory, two figures: ``peak MB``, the most bytes of tensors alive at once during one call
beyond those that existed before it (inputs and parameters), read from torch.profiler's
memory timeline; parameter gradients are left out (an MoE layer has E/K times the dense
FFN's parameters, so their gradients measure the parameter count, not the implementation).
And ``saved MB``, the bytes of the distinct non-parameter tensors autograd saves for backward
plus the output: what a forward keeps alive until its backward, which a deep model stacks.
FLOPs are the useful (active) ones: 6*D*F per routed slot and 6*D*F_shared per token forward,
times 3 for forward+backward; the router is not counted.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from moekit import MoEConfig, MoELayer
from moekit.layers.mlp import MLP


@dataclass(frozen=True)
class Shape:
    d_model: int
    d_expert: int
    num_experts: int
    top_k: int
    num_shared: int = 0

    @property
    def active_ff(self) -> int:
        return self.top_k * self.d_expert + self.num_shared * self.d_expert


SHAPES = {
    "coarse": Shape(512, 1792, 8, 2),
    "fine": Shape(512, 256, 64, 8),
    "fine+shared": Shape(512, 256, 64, 6, 2),
}
MODES = ("fwd+bwd", "fwd", "decode1", "decode8")
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row:
    shape: str
    dtype: str
    mode: str
    tokens: int
    name: str
    ms: float | None = None  # median
    tokens_per_s: float | None = None
    gflops: float | None = None  # achieved, useful FLOPs
    vs_dense: float | None = None  # time / dense time
    vs_hf_best: float | None = None  # time / best transformers time
    saved_mb: float | None = None  # saved for backward + output (see module docstring)
    peak_mb: float | None = None  # peak extra memory of one call, parameter gradients excluded
    note: str = ""
    times_ms: list[float] = field(default_factory=list)


class DenseSwiGLU(nn.Module):
    """The compute floor: one fused gate+up matmul, SwiGLU, one down matmul (F.linear layout)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.mlp = MLP(d_model, d_ff, "swiglu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def build_candidates(shape: Shape, tokens: int, with_loop: bool, hf: bool) -> dict[str, nn.Module | str]:
    """name -> module, or name -> reason string when the candidate is skipped."""
    torch.manual_seed(0)
    cands: dict[str, nn.Module | str] = {}
    cfg = MoEConfig(d_model=shape.d_model, d_expert=shape.d_expert, num_experts=shape.num_experts,
                    top_k=shape.top_k, num_shared_experts=shape.num_shared,
                    shared_expert_gate=shape.num_shared > 0, norm_topk_prob=shape.num_shared == 0)
    moe = MoELayer(cfg)
    moe.reset_parameters(0.02, 0.02)
    cands["moekit"] = moe
    if with_loop:
        loop = MoELayer(cfg)
        loop.load_state_dict(moe.state_dict())
        loop.impl = "loop"
        cands["moekit[loop]"] = loop
    dense = DenseSwiGLU(shape.d_model, shape.active_ff)
    for p in dense.parameters():
        nn.init.normal_(p, std=0.02)
    cands["dense"] = dense
    if hf:
        cands.update(_hf_candidates(shape, tokens))
    return cands


def _hf_candidates(shape: Shape, tokens: int) -> dict[str, nn.Module | str]:
    try:
        from transformers import MixtralConfig, Qwen2MoeConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    except ImportError as e:
        return {"hf": f"transformers not importable ({e})"}
    out: dict[str, nn.Module | str] = {}
    for impl in HF_IMPLS:
        # batched_mm gathers one [2F, D] weight per routed slot: T*K*3*D*F*4 bytes at fp32.
        gathered_gb = tokens * shape.top_k * 3 * shape.d_model * shape.d_expert * 4 / 1e9
        if impl == "batched_mm" and gathered_gb > 4:
            out[f"hf[{impl}]"] = f"skipped: would gather {gathered_gb:.0f} GB of expert weights"
            continue
        if shape.num_shared:
            cfg = Qwen2MoeConfig(hidden_size=shape.d_model, moe_intermediate_size=shape.d_expert,
                                 shared_expert_intermediate_size=shape.num_shared * shape.d_expert,
                                 num_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
                                 norm_topk_prob=False, experts_implementation=impl)
            block = Qwen2MoeSparseMoeBlock(cfg)
        else:
            cfg = MixtralConfig(hidden_size=shape.d_model, intermediate_size=shape.d_expert,
                                num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
                                experts_implementation=impl)
            block = MixtralSparseMoeBlock(cfg)
        for p in block.parameters():
            nn.init.normal_(p, std=0.02)
        out[f"hf[{impl}]"] = block
    return out


def useful_flops(shape: Shape, tokens: int, mode: str) -> float:
    fwd = 6 * shape.d_model * shape.active_ff * tokens
    return 3 * fwd if mode == "fwd+bwd" else fwd


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor | None) -> None:
    if dy is None:
        with torch.no_grad():
            module(x)
        return
    xi = x.detach().requires_grad_(True)
    y = module(xi)
    y.backward(dy)
    for p in module.parameters():
        p.grad = None


def saved_bytes(module: nn.Module, x: torch.Tensor, train: bool) -> int:
    """Bytes of distinct non-parameter tensors saved for backward, plus the output's."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    xi = x.detach().requires_grad_(train)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(train):
        y = module(xi)
    return sum(seen.values()) + y.numel() * y.element_size()


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints two lines to stderr per use ("USDT: ... profiler_start");
    they would bury the benchmark's table, so fd 2 points at /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(module: nn.Module, x: torch.Tensor, dy: torch.Tensor | None) -> int | None:
    """Peak bytes of tensors alive at once during one ``_step`` beyond those that existed
    before it, parameter gradients excluded (see the module docstring); None where this
    torch's profiler has no memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action
    except ImportError:
        return None
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as prof:
        xi = x.detach().requires_grad_(dy is not None)
        with torch.set_grad_enabled(dy is not None):
            y = module(xi)
        if dy is not None:
            y.backward(dy)
        del y, xi
    grads = {p.grad.untyped_storage().data_ptr() for p in module.parameters() if p.grad is not None}
    for p in module.parameters():
        p.grad = None
    try:
        timeline = prof._memory_profile().timeline  # private to torch: may change between releases
    except (AttributeError, ValueError):
        return None
    live = peak = 0
    for _, action, (key, _), size in timeline:
        storage = getattr(key, "storage", None)  # plain Keys (no tensor id) are counted
        if storage is not None and storage.ptr in grads:
            continue
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def run_case(shape_name: str, dtype_name: str, mode: str, tokens: int, repeats: int, warmup: int,
             with_loop: bool, hf: bool) -> list[Row]:
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    T = {"decode1": 1, "decode8": 8}.get(mode, tokens)
    train = mode == "fwd+bwd"
    cands = build_candidates(shape, T, with_loop, hf)
    rows = {n: Row(shape_name, dtype_name, mode, T, n) for n in cands}
    live = {n: m.to(dtype).train(train) for n, m in cands.items() if isinstance(m, nn.Module)}
    for n, m in cands.items():
        if isinstance(m, str):
            rows[n].note = m
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, shape.d_model, generator=g).to(dtype)
    dy = torch.randn(1, T, shape.d_model, generator=g).to(dtype) if train else None
    for n, m in live.items():
        rows[n].saved_mb = saved_bytes(m, x, train) / 2**20
        peak = peak_bytes(m, x, dy)
        rows[n].peak_mb = None if peak is None else peak / 2**20
        for _ in range(warmup):
            _step(m, x, dy)
    for _ in range(repeats):
        for n, m in live.items():  # interleaved
            t0 = time.perf_counter()
            _step(m, x, dy)
            rows[n].times_ms.append((time.perf_counter() - t0) * 1e3)
    _fill(rows, shape, T, mode)
    return list(rows.values())


def _fill(rows: dict[str, Row], shape: Shape, T: int, mode: str) -> None:
    for r in rows.values():
        if r.times_ms:
            r.ms = statistics.median(r.times_ms)
            r.tokens_per_s = T / r.ms * 1e3
            r.gflops = useful_flops(shape, T, mode) / r.ms / 1e6
    dense = rows["dense"].ms
    hf_times = [r.ms for n, r in rows.items() if n.startswith("hf[") and r.ms is not None]
    for r in rows.values():
        if r.ms is not None:
            r.vs_dense = r.ms / dense
            r.vs_hf_best = r.ms / min(hf_times) if hf_times else None


def format_table(rows: list[Row]) -> str:
    head = f"{'shape':<12}{'dtype':<6}{'mode':<9}{'T':>6}  {'impl':<16}{'ms':>10}{'tok/s':>10}{'GFLOP/s':>9}" \
           f"{'/dense':>8}{'/hf best':>9}{'peak MB':>9}{'saved MB':>10}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(v, fmt):  # a missing value keeps the column's width
            return format(v, fmt) if v is not None else format("-", ">" + fmt.split(".")[0])
        lines.append(f"{r.shape:<12}{r.dtype:<6}{r.mode:<9}{r.tokens:>6}  {r.name:<16}{f(r.ms, '10.2f')}"
                     f"{f(r.tokens_per_s, '10.0f')}{f(r.gflops, '9.1f')}{f(r.vs_dense, '8.2f')}"
                     f"{f(r.vs_hf_best, '9.2f')}{f(r.peak_mb, '9.1f')}{f(r.saved_mb, '10.1f')}  {r.note}")
    return "\n".join(lines)


def rows_to_json(rows: list[Row], meta: dict) -> dict:
    return {"meta": meta, "rows": [asdict(r) for r in rows]}
