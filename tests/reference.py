"""Plain, obviously-correct references the fast paths are tested against.

The per-expert loop below re-derives the MoE layer's output from the router's decisions with
masks (as transformers' Mixtral reference does): no sorting, no dispatch plan, no shared code
with moekit's dispatch or combine.
"""

import math

import torch

from moekit.layers.mlp import activate


def clamped_swiglu(h, limit, alpha):
    """gpt-oss's activation as its model card writes it (gate and up as moekit's halves)."""
    gate, up = h.chunk(2, dim=-1)
    gate = torch.where(gate > limit, torch.full_like(gate, limit), gate)
    up = torch.maximum(torch.minimum(up, torch.full_like(up, limit)), torch.full_like(up, -limit))
    return gate * (1 / (1 + torch.exp(-alpha * gate))) * (up + 1)


def limited_swiglu(h, limit):
    """DeepSeek-V4's activation as transformers' DeepseekV4Experts writes it (moekit's halves)."""
    gate, up = h.chunk(2, dim=-1)
    gate = torch.where(gate > limit, torch.full_like(gate, limit), gate)
    up = torch.maximum(torch.minimum(up, torch.full_like(up, limit)), torch.full_like(up, -limit))
    return gate * torch.sigmoid(gate) * up


def ffn_activation(cfg, h):
    """The expert activation of ``cfg``, from the definitions above where it is a clamped kind."""
    if cfg.activation == "clamped_swiglu":
        return clamped_swiglu(h, cfg.swiglu_limit, cfg.swiglu_alpha)
    if cfg.activation == "limited_swiglu":
        return limited_swiglu(h, cfg.swiglu_limit)
    return activate(h, cfg.activation)


def expert_ffn(layer, e, x):
    cfg, ex = layer.cfg, layer.experts
    w_in, w_out = ex.w_in[e].to(x.dtype), ex.w_out[e].to(x.dtype)  # [out, in]
    h = x @ w_in.t()
    if cfg.expert_proj_bias:
        h = h + ex.b_in[e].to(x.dtype)
    y = ffn_activation(cfg, h) @ w_out.t()
    return y + ex.b_out[e].to(x.dtype) if cfg.expert_proj_bias else y


def reference_moe(layer, x, padding_mask=None):
    """Loop over experts; for each, find its tokens by mask, apply capacity by score, add."""
    cfg = layer.cfg
    B, S, D = x.shape
    x_TD = x.reshape(B * S, D)
    valid = None if padding_mask is None else padding_mask.reshape(-1).bool()
    r = layer.router(x_TD, valid)
    out = torch.zeros(B * S, D, dtype=torch.float32)
    n_valid = B * S if valid is None else int(valid.sum())
    for e in range(cfg.num_experts):
        if r.expert_choice:
            tok, w = r.ids[e], r.weights[e]
        else:
            tok, kpos = torch.where(r.ids == e)
            if valid is not None:
                keep = valid[tok]
                tok, kpos = tok[keep], kpos[keep]
            w, score = r.weights[tok, kpos], r.scores[tok, kpos]
            cf = cfg.capacity_factor
            if cf is not None:
                cap = math.ceil(cf * n_valid * cfg.top_k / cfg.num_experts)
                best = torch.argsort(score, descending=True)[:cap]
                tok, w = tok[best], w[best]
        for t, wt in zip(tok.tolist(), w):
            if cfg.gate_input:  # Llama 4: the weight scales what the expert sees
                out[t] += expert_ffn(layer, e, (wt * x_TD[t : t + 1].float()).to(x.dtype))[0].float()
            else:
                out[t] += wt * expert_ffn(layer, e, x_TD[t : t + 1])[0].float()
    if cfg.num_shared_experts:
        sw_in, sw_out = layer.shared.w_in.weight.to(x.dtype), layer.shared.w_out.weight.to(x.dtype)
        y = ffn_activation(cfg, x_TD @ sw_in.t()) @ sw_out.t()
        if cfg.shared_expert_gate:
            y = torch.sigmoid(x_TD @ layer.shared_gate.weight.to(x.dtype).t()) * y
        out = out + y.float()
    return out.to(x.dtype).view(B, S, D), r
