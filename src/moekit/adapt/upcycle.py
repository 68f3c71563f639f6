"""Sparse upcycling: a trained dense model -> an MoE model whose step-0 output is the dense one.

Shape legend: D model dim, F dense FFN hidden width, G granularity (shards per FFN),
E experts, C = E / G copies of each shard, F_e = F / G expert hidden width, K experts per token.
Dense ``MLP.w_in`` is [2F, D] for SwiGLU (gate rows, then up rows) or [F, D]; ``w_out`` is [D, F].
Routed experts are stacked: ``w_in`` [E, 2F_e | F_e, D], ``w_out`` [E, D, F_e].

Plan (every FFN layer becomes an MoE layer; attention, norms and embeddings are copied):
1. Shard the dense FFN along its hidden width into G pieces (G = 1: the whole FFN).
   Because the FFN is a sum over hidden units, dense(x) = sum_g shard_g(x).
2. Expert e = c * G + g holds shard g (copy c): "copy" upcycling (Komatsuzaki et al. 2022,
   "Sparse Upcycling") when G = 1; NVIDIA's virtual groups (He et al. 2024, "Upcycling LLMs
   into MoE") when G > 1.
3. A new router, N(0, init_std), whose rows are tied within a copy: the G shards of copy c
   get the same logit, so a top-K with G | K selects whole copies. With renormalized top-K
   the weights of the selected K slots sum to 1, so the copies' weights sum to 1 / G, and the
   routed output is dense(x) / G: the down projections are scaled by G (Megatron's weight
   scaling for granular upcycling) and the step-0 output equals the dense output.
4. N shared experts (DeepSeekMoE-style always-on FFN) are N more copies of the dense FFN; to
   keep the sum equal to dense(x), shared and routed down projections are scaled by
   N / (N + 1) / N and 1 / (N + 1).
5. "drop" (Drop-Upcycling, Nakamura et al. 2025): in each expert, a random fraction R of the
   hidden units is re-initialized from N(mean, std) of the dense matrix it came from, so
   experts start diverse; step 0 then no longer equals dense (the command reports by how much).
   ``noise`` adds N(0, noise) to every routed expert weight for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from moekit.config import MoEConfig, ModelConfig, check_choice, check_float, check_int
from moekit.errors import ConfigError
from moekit.model import MoETransformer

STRATEGIES = ("copy", "drop")


@dataclass
class UpcycleConfig:
    """How a dense model becomes an MoE model (see the module docstring for the math)."""

    num_experts: int  # E: routed experts per layer
    top_k: int  # K: experts per token; with granularity G it must be a multiple of G
    granularity: int = 1  # G: shards of the dense FFN along its width (1 = whole copies)
    shared: int = 0  # always-on shared experts, each a copy of the dense FFN
    strategy: str = "copy"  # copy | drop (Drop-Upcycling)
    drop_ratio: float = 0.5  # drop: share of each expert's hidden units re-initialized (the paper's best: 0.5)
    noise: float = 0.0  # std of Gaussian noise added to every routed expert weight (0 = none)
    load_balance_coef: float = 0.01  # Switch aux loss for the new routers
    seed: int = 0  # router init, drop choices and noise

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "granularity"):
            check_int(name, getattr(self, name))
        check_int("shared", self.shared, minimum=0)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_float("drop_ratio", self.drop_ratio)
        if self.drop_ratio > 1:
            raise ConfigError(f"drop_ratio must be <= 1, got {self.drop_ratio}")
        check_float("noise", self.noise)
        check_float("load_balance_coef", self.load_balance_coef)
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.num_experts % self.granularity:
            raise ConfigError(f"granularity ({self.granularity}) must divide num_experts ({self.num_experts})")
        if self.top_k % self.granularity:
            raise ConfigError(f"top_k ({self.top_k}) must be a multiple of granularity ({self.granularity}): "
                             "a token must get whole copies of the FFN for step 0 to equal the dense model")


def check_upcyclable(cfg: ModelConfig, up: UpcycleConfig) -> None:
    """ValueError naming why ``cfg`` cannot be upcycled as ``up`` asks."""
    if cfg.moe is not None:
        raise ConfigError(f"the model is already MoE ({cfg.moe.num_experts} experts): upcycling takes a dense model")
    if cfg.d_ff % up.granularity:
        raise ConfigError(f"granularity {up.granularity} does not divide the FFN width d_ff={cfg.d_ff}")


def upcycled_config(cfg: ModelConfig, up: UpcycleConfig) -> ModelConfig:
    """The MoE twin of dense ``cfg``: every layer MoE, softmax router, renormalized top-k, dropless."""
    check_upcyclable(cfg, up)
    moe = MoEConfig(
        d_model=cfg.d_model, d_expert=cfg.d_ff // up.granularity, num_experts=up.num_experts, top_k=up.top_k,
        router="softmax", activation=cfg.ffn_activation,
        norm_topk_prob=True,  # step-0 equality needs the chosen weights to sum to 1, also for top-1
        num_shared_experts=up.shared, d_shared=up.shared * cfg.d_ff if up.shared else None,
        capacity_factor=None,  # dropless: a dropped slot would change the step-0 output
        load_balance_coef=up.load_balance_coef,
    )
    return replace(cfg, moe=moe, moe_every=1, first_dense_layers=0, dense_layers=(), hf_architecture=None)


@torch.no_grad()
def upcycle(dense: MoETransformer, up: UpcycleConfig) -> MoETransformer:
    """Dense model -> a new MoE model (same dtype and device; the dense model is not changed)."""
    cfg = upcycled_config(dense.cfg, up)
    weight = dense.embed.weight
    gen = torch.Generator(device="cpu").manual_seed(up.seed)
    moe = MoETransformer(cfg).to(device=weight.device, dtype=weight.dtype)
    ffn_prefixes = tuple(f"blocks.{i}.ffn." for i in range(cfg.n_layers))
    rest = {k: v for k, v in dense.state_dict().items() if not k.startswith(ffn_prefixes)}
    missing, unexpected = moe.load_state_dict(rest, strict=False)
    assert not unexpected and all(k.startswith(ffn_prefixes) for k in missing), (missing, unexpected)
    for dense_block, moe_block in zip(dense.blocks, moe.blocks):
        _fill_moe_layer(moe_block.ffn, dense_block.ffn, up, cfg.init_std, gen)
    return moe.train(dense.training)


def _fill_moe_layer(layer: nn.Module, mlp: nn.Module, up: UpcycleConfig, init_std: float,
                    gen: torch.Generator) -> None:
    G, E, N = up.granularity, up.num_experts, up.shared
    routed_scale = G / (N + 1)  # step 3 (x G) and step 4 (share with the shared experts)
    w_in_GHD, w_out_GDF = _shards(mlp.w_in.weight, mlp.w_out.weight, G, layer.experts.activation)
    copies = E // G
    w_in = w_in_GHD.repeat(copies, 1, 1)  # [E, H_e, D], expert e = c * G + g holds shard g
    w_out = w_out_GDF.repeat(copies, 1, 1) * routed_scale  # [E, D, F_e]
    if up.strategy == "drop":
        w_in, w_out = _drop(w_in, w_out, mlp.w_in.weight, mlp.w_out.weight, up.drop_ratio, layer.experts.activation, gen)
    if up.noise > 0:
        w_in = w_in + _randn(w_in.shape, gen).to(w_in) * up.noise
        w_out = w_out + _randn(w_out.shape, gen).to(w_out) * up.noise
    layer.experts.w_in.copy_(w_in)
    layer.experts.w_out.copy_(w_out)
    rows_CD = _randn((copies, layer.router.weight.shape[1]), gen) * init_std
    layer.router.weight.copy_(rows_CD.repeat_interleave(G, dim=0))  # copy_ casts and moves  # [E, D]: rows tied within a copy
    if N:
        layer.shared.w_in.weight.copy_(_stack_shared(mlp.w_in.weight, N, layer.experts.activation))
        layer.shared.w_out.weight.copy_(mlp.w_out.weight.repeat(1, N) / (N + 1))


def _shards(w_in: torch.Tensor, w_out: torch.Tensor, G: int, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense w_in [H, D], w_out [D, F] -> G shards along the hidden width: [G, H/G, D], [G, D, F/G].
    For SwiGLU, shard g takes gate rows and up rows of the same hidden units."""
    D, F = w_out.shape
    if activation == "swiglu":
        gate, up = w_in.view(2, G, F // G, D).unbind(0)  # [G, F/G, D] each
        w_in_G = torch.cat([gate, up], dim=1)  # [G, 2F/G, D]: gate first, as Experts expects
    else:
        w_in_G = w_in.view(G, F // G, D)
    return w_in_G, w_out.view(D, G, F // G).permute(1, 0, 2)  # [G, D, F/G]


def _stack_shared(w_in: torch.Tensor, N: int, activation: str) -> torch.Tensor:
    """N copies of the dense first projection as one wide FFN: [gate x N | up x N] for SwiGLU."""
    if activation != "swiglu":
        return w_in.repeat(N, 1)
    gate, up = w_in.chunk(2, dim=0)
    return torch.cat([gate.repeat(N, 1), up.repeat(N, 1)])


def _drop(w_in: torch.Tensor, w_out: torch.Tensor, dense_in: torch.Tensor, dense_out: torch.Tensor, ratio: float,
          activation: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-Upcycling: per expert, re-initialize round(ratio * F_e) hidden units (their gate/up
    rows and down column) from N(mean, std) of the dense matrix they came from."""
    E, D, F_e = w_out.shape
    n = round(ratio * F_e)
    if n == 0:
        return w_in, w_out
    w_in, w_out = w_in.clone(), w_out.clone()
    dense_parts = dense_in.chunk(2, dim=0) if activation == "swiglu" else (dense_in,)
    for e in range(E):
        units = torch.randperm(F_e, generator=gen)[:n].to(w_in.device)
        for p, part in enumerate(dense_parts):  # gate rows p=0, up rows p=1 (SwiGLU)
            w_in[e, p * F_e + units] = _like(part, (n, D), gen)
        w_out[e][:, units] = _like(dense_out, (D, n), gen)
    return w_in, w_out


def _like(w: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    w32 = w.float()
    return (_randn(shape, gen) * w32.std() + w32.mean()).to(device=w.device, dtype=w.dtype)


def _randn(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen)  # on the CPU, for the same numbers on every device


@torch.no_grad()
def step0_logit_difference(dense: MoETransformer, moe: MoETransformer, tokens: torch.Tensor) -> float:
    """Max |logits_moe - logits_dense| over ``tokens`` [B, S], both models in eval mode."""
    modes = dense.training, moe.training
    dense.eval(), moe.eval()
    diff = (moe(tokens).logits.float() - dense(tokens).logits.float()).abs().max().item()
    dense.train(modes[0]), moe.train(modes[1])
    return diff if math.isfinite(diff) else float("inf")


__all__ = ["UpcycleConfig", "STRATEGIES", "upcycle", "upcycled_config", "check_upcyclable", "step0_logit_difference"]
