"""Llama 4 text models (Meta 2025, Llama 4 Scout / Maverick): ``Llama4ForCausalLM`` checkpoints and
the language model inside ``Llama4ForConditionalGeneration`` ones (its vision tower and projector
are skipped with a note, and such a model exports as ``Llama4ForCausalLM``).

What Llama 4 adds, each an option of moekit's own layers:
- routing: top-1 by the router logits, the expert's *input* scaled by sigmoid(logit)
  (``MoEConfig(router="sigmoid", selection_bias=False, gate_input=True)``), plus one always-on
  shared expert; MoE every ``interleave_moe_layer_step``-th layer (Maverick: every other), dense
  FFNs of width ``intermediate_size_mlp`` elsewhere;
- attention: every ``no_rope_layer_interval``-th layer has no RoPE (``nope_layers``) and attends
  globally with attention temperature tuning; the other layers use RoPE, chunked attention
  (``attention_chunk``, 8192) and a weightless RMS "L2" norm on q and k (``qk_norm="l2"``).

Layout: RoPE rotates interleaved pairs (complex form), so the rows of q_proj and k_proj are
permuted per head to moekit's half-split layout on load and back on export; experts are fused
[E, in, out] tensors (gate | up along the last dim), transposed on load.
"""

from __future__ import annotations

import torch

from moekit.config import MoEConfig, ModelConfig
from moekit.errors import ConfigError
from moekit.interop.family import Family, Fields, HFConfig, Naming, Representable, llama_fields, llama_to_hf
from moekit.interop.names import Permuted, Piece

ARCH, MULTIMODAL = "Llama4ForCausalLM", "Llama4ForConditionalGeneration"
_DEFAULTS = dict(
    rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072, num_key_value_heads=8,
    intermediate_size_mlp=16384, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
    use_qk_norm=True, router_aux_loss_coef=0.001, no_rope_layer_interval=4, attn_temperature_tuning=True,
    floor_scale=8192, attn_scale=0.1, attention_bias=False,
)
LAYER_TYPES = ("chunked_attention", "full_attention")


def _attention(f: Fields, n: int) -> dict:
    """nope_layers, chunking, global layers and temperature tuning, as Llama4TextConfig derives them."""
    interval = f("no_rope_layer_interval")
    use_rope = f.hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    if len(use_rope) != n or any(r not in (0, 1) for r in use_rope):
        raise ConfigError(f"{f.label}: no_rope_layers must be {n} entries of 0 or 1; got {use_rope!r}")
    nope = tuple(i for i, r in enumerate(use_rope) if not r)
    chunk = f.hf.get("attention_chunk_size", 8192)
    types = f.hf.get("layer_types") or ["chunked_attention" if r and chunk is not None else "full_attention"
                                        for r in use_rope]
    if len(types) != n or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"{f.label}: layer_types must be {n} entries of {', '.join(LAYER_TYPES)}; got {types!r}")
    global_layers = tuple(i for i, t in enumerate(types) if t == "full_attention")
    if chunk is None or len(global_layers) == n:
        chunk, global_layers = None, ()
    tuning = f.hf.get("attn_temperature_tuning", True)  # Scout's config.json says 4: read as truthy, as transformers does
    if isinstance(tuning, str) or not isinstance(tuning, (bool, int)):
        raise ConfigError(f"{f.label} config.json: attn_temperature_tuning must be true or false, got {tuning!r}")
    tuning = bool(tuning) and bool(nope)
    return dict(nope_layers=nope, attention_chunk=chunk, global_layers=global_layers,
                attn_temperature_floor=f("floor_scale") if tuning else None,
                attn_temperature_scale=float(f("attn_scale")))


def _moe_layers(f: Fields, n: int) -> tuple[tuple[int, ...], dict]:
    step = f("interleave_moe_layer_step")
    moe = f.hf.get("moe_layers")
    moe = list(range(step - 1, n, step)) if moe is None else sorted(moe)
    if any(not 0 <= i < n for i in moe):
        raise ConfigError(f"{f.label}: moe_layers {moe} fall outside 0..{n - 1}")
    if moe == list(range(step - 1, n, step)):
        return tuple(moe), dict(moe_every=step)
    return tuple(moe), dict(moe_every=1, dense_layers=tuple(i for i in range(n) if i not in moe))


def llama4_text_config(hf: HFConfig, arch: str = ARCH) -> ModelConfig:
    f = Fields(hf, _DEFAULTS, arch)
    base = llama_fields(f, arch)
    if "head_dim" not in hf and base["d_model"] // base["n_heads"] != 128:  # Llama4TextConfig's default
        base["head_dim"] = 128
    n = base["n_layers"]
    moe_ids, pattern = _moe_layers(f, n)
    if (k := f("num_experts_per_tok")) != 1:
        raise ConfigError(f"{arch}: num_experts_per_tok={k} is not supported (Llama 4's input gating is top-1 in moekit)")
    moe = MoEConfig(
        d_model=base["d_model"], d_expert=f("intermediate_size"), num_experts=f("num_local_experts"), top_k=1,
        router="sigmoid", selection_bias=False, gate_input=True, norm_topk_prob=False, num_shared_experts=1,
        load_balance_coef=float(f("router_aux_loss_coef")),
    ) if moe_ids else None
    bias = bool(f("attention_bias"))
    base.update(d_ff=f("intermediate_size_mlp"), hf_architecture=arch)
    return ModelConfig(**base, qkv_bias=bias, out_bias=bias, qk_norm="l2" if f("use_qk_norm") else None,
                       moe=moe, **pattern, **_attention(f, n))


def llama4_multimodal_config(hf: HFConfig) -> ModelConfig:
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{MULTIMODAL} config.json lacks a 'text_config' mapping")
    return llama4_text_config(text, MULTIMODAL)


def llama4_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, ARCH)
    qk_norm = cfg.qk_norm if cfg.qk_norm in (None, "l2") else "l2"  # use_qk_norm true or false
    r.attention(qkv_bias=cfg.qkv_bias, out_bias=cfg.qkv_bias, qk_norm=qk_norm, sliding=False, per_layer_window=True)
    r.moe("sigmoid", shared=True)
    m = cfg.moe
    if m is not None:
        r.need(m.gate_input and not m.has_selection_bias and m.top_k == 1,
               "routing other than top-1 sigmoid gating of the expert input without a selection bias")
        r.need(not m.renormalize and m.routed_scaling_factor == 1.0 and m.num_groups == 1, "renormalized, scaled or grouped routing")
        r.need(m.num_shared_experts == 1 and m.shared_width == m.d_expert, "a shared expert other than one of width d_expert")
    r.check()
    n = cfg.n_layers
    out = llama_to_hf(cfg, ARCH, "llama4_text")
    out.update(
        head_dim=cfg.resolved_head_dim, intermediate_size=m.d_expert, intermediate_size_mlp=cfg.d_ff,
        num_local_experts=m.num_experts, num_experts_per_tok=1, moe_layers=cfg.moe_layer_ids,
        interleave_moe_layer_step=cfg.moe_every, router_aux_loss_coef=m.load_balance_coef,
        use_qk_norm=cfg.qk_norm == "l2", attention_bias=cfg.qkv_bias,
        no_rope_layers=[int(cfg.uses_rope(i)) for i in range(n)], attention_chunk_size=cfg.attention_chunk,
        layer_types=["chunked_attention" if cfg.chunk_of(i) else "full_attention" for i in range(n)],
        attn_temperature_tuning=cfg.attn_temperature_floor is not None,
        floor_scale=cfg.attn_temperature_floor or 8192, attn_scale=cfg.attn_temperature_scale,
    )
    return out


def llama4_multimodal_hf(cfg: ModelConfig) -> HFConfig:
    raise ConfigError(f"{MULTIMODAL} cannot represent this model: moekit loads its language model only "
                      f"(no vision tower); save it with architecture='{ARCH}'")


def _deinterleave(width: int) -> torch.Tensor:
    return torch.cat((torch.arange(0, width, 2), torch.arange(1, width, 2)))


def rope_row_permutation(suffix: str, cfg: ModelConfig, hf: HFConfig) -> torch.Tensor | None:
    """Rows of q_proj / k_proj (weight and bias) per head: interleaved rope pairs -> half-split."""
    heads = {"attn.wq.weight": cfg.n_heads, "attn.wq.bias": cfg.n_heads,
             "attn.wk.weight": cfg.kv_heads, "attn.wk.bias": cfg.kv_heads}.get(suffix)
    if heads is None:
        return None
    hd = cfg.resolved_head_dim
    return torch.cat([h * hd + _deinterleave(hd) for h in range(heads)])


def expert_pieces(which: str, shape: tuple[int, ...], prefix: str) -> list[Piece]:
    """Fused experts: gate_up_proj [E, D, 2F] (gate then up) and down_proj [E, F, D], transposed."""
    if which not in ("w_in", "w_out"):
        return []
    name = "gate_up_proj" if which == "w_in" else "down_proj"
    return [Piece(prefix + name, transform=Permuted(None, transpose=True))]


def is_vision_tensor(name: str, cfg: ModelConfig) -> bool:
    return name.startswith(("vision_model.", "multi_modal_projector."))


_NAMING = Naming(moe="feed_forward", router="router", dense="feed_forward")
LLAMA4 = Family((ARCH,), "llama4_text", llama4_text_config, llama4_hf, _NAMING,
                row_permutation=rope_row_permutation, expert_pieces=expert_pieces)
LLAMA4_MULTIMODAL = Family(
    (MULTIMODAL,), "llama4", llama4_multimodal_config, llama4_multimodal_hf, _NAMING,
    row_permutation=rope_row_permutation, expert_pieces=expert_pieces, skipped=is_vision_tensor,
    skip_note="vision tensor(s) (vision_model.*, multi_modal_projector.*): moekit loads the language model only",
    prefix="language_model.",
)
