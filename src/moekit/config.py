"""Typed, validated configs for the MoE layer and the decoder model.

Configs are plain data (no devices, no callables), validated in ``__post_init__`` so a bad
value fails where it is written, with a ``ConfigError`` (a ``ValueError``) naming the field.
They round-trip through ``to_dict``/``from_dict`` (and so through JSON); every config's
``from_dict`` refuses unknown fields through ``check_fields``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moekit.errors import ConfigError

ROUTERS = ("softmax", "noisy", "sigmoid", "sqrtsoftplus", "expert_choice")
ACTIVATIONS = ("swiglu", "gelu", "relu")
# Routed experts may also use GPT-OSS's clamped SwiGLU or DeepSeek-V4's limited SwiGLU (see
# MoEConfig.swiglu_limit).
EXPERT_ACTIVATIONS = ACTIVATIONS + ("clamped_swiglu", "limited_swiglu")
SWIGLU_KINDS = ("swiglu", "clamped_swiglu", "limited_swiglu")  # gate and up fused in one projection
GROUP_SCORES = ("top2", "max")  # how group-limited routing ranks a group (MoEConfig.group_score)
QK_NORMS = ("head", "full", "l2")
ATTENTIONS = ("gqa", "mla", "compressed")
KV_COMPRESSIONS = ("none", "csa", "hca")  # per layer of attention="compressed" (CompressionConfig)
# RoPE context-extension schemes, named as in Hugging Face's rope_scaling, and their keys:
# (required, optional). "factor" stretches the positions; see moekit.layers.rope for the math.
ROPE_SCALINGS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"factor"}), frozenset()),
    "llama3": (
        frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
        frozenset(),
    ),
    "yarn": (
        frozenset({"factor", "original_max_position_embeddings"}),
        frozenset({"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}),
    ),
}

def first_proj_width(d_ff: int, activation: str) -> int:
    """Output width of the first projection: gate and up fused for the SwiGLU kinds."""
    return 2 * d_ff if activation in SWIGLU_KINDS else d_ff


# Field checks: every config (here, training, data, inference, distributed) validates with these,
# so a bad value fails with the same one-line ConfigError naming the field.
def check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def check_float(name: str, value: Any, minimum: float = 0.0, *, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise ConfigError(f"{name} must be {op} {minimum}, got {value}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


# The former private names, kept only until branches written against them move to the public
# ones above (no module of main uses them).
_check_int, _check_float, _check_choice, _check_bool = check_int, check_float, check_choice, check_bool


def check_fields(cls, data: Any, where: str | None = None) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``; a ConfigError naming unknown fields
    (a typo in a config file must not be silently ignored) or a ``data`` that is not a mapping."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of fields, got {type(data).__name__} {data!r:.60}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(f"unknown {where} field(s) {unknown}; known: {sorted(known)}")
    return dict(data)


@dataclass
class MoEConfig:
    """One mixture-of-experts feed-forward layer: router, experts, balancing."""

    d_model: int
    d_expert: int  # hidden width of one routed expert (fine-grained experts: just make it small)
    num_experts: int
    top_k: int = 2  # experts per token; for expert_choice, the average experts per token
    # softmax | noisy (Shazeer 2017) | sigmoid (DeepSeek-V3) | sqrtsoftplus (DeepSeek-V4: sqrt(softplus(s)),
    # otherwise routed like sigmoid) | expert_choice
    router: str = "softmax"
    # swiglu | gelu | relu | clamped_swiglu (GPT-OSS; routed experts only) | limited_swiglu (DeepSeek-V4)
    activation: str = "swiglu"
    # clamped_swiglu (OpenAI 2025, gpt-oss model card): gate = min(gate, limit), up = clamp(up,
    # -limit, limit), out = gate * sigmoid(alpha * gate) * (up + 1). The clamp keeps rare huge
    # activations from overflowing low-precision experts; gpt-oss uses limit 7, alpha 1.702.
    # limited_swiglu (DeepSeek-V4, transformers' DeepseekV4Experts): the same two clamps around a
    # plain SwiGLU, silu(min(gate, limit)) * clamp(up, -limit, limit), in routed and shared
    # experts alike; V4 uses limit 10 (no alpha).
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    router_bias: bool = False  # a learned bias on the router logits (GPT-OSS)
    expert_proj_bias: bool = False  # biases on both projections of every routed expert (GPT-OSS)
    # Renormalize the k chosen weights to sum to 1. None picks the published convention:
    # yes for top_k > 1 (Mixtral); no for top_k == 1, where Switch scales the output by the
    # chosen probability (renormalizing would make it a constant 1 and cut the router's gradient).
    norm_topk_prob: bool | None = None
    routed_scaling_factor: float = 1.0  # DeepSeek-V3 multiplies the routed output by 2.5
    num_groups: int = 1  # group-limited routing (DeepSeek-V3 n_group): experts in equal groups
    topk_groups: int = 1  # ...of which each token may use the best topk_groups
    # ...ranked by "top2": the sum of a group's two best scores (DeepSeek-V3 noaux_tc), or "max": its
    # best score (DeepSeek-V2's group_limited_greedy, sec. 2.2.2 "device-limited routing").
    group_score: str = "top2"
    num_shared_experts: int = 0  # always-on experts (DeepSeekMoE); computed as one dense FFN
    d_shared: int | None = None  # that FFN's width; default num_shared_experts * d_expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x . w) scales the shared output
    # Per-expert capacity = ceil(cf * tokens * top_k / num_experts); None = dropless.
    # expert_choice needs a capacity: None means 1.0 there (same compute as token-choice top-k).
    capacity_factor: float | None = None
    router_jitter: float = 0.0  # multiplicative U(1-eps, 1+eps) noise on the router input (Switch)
    load_balance_coef: float = 0.01  # Switch aux loss; 0.01 in Switch, 0.02 in Mixtral
    seq_balance_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss (they use 1e-4)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss (they use 1e-3)
    # Auxiliary-loss-free balancing (Wang et al. 2024): bias += rate * sign(mean_load - load).
    # The bias exists for the sigmoid router always (DeepSeek-V3's e_score_correction_bias)
    # and for softmax/noisy when rate > 0; the rate DeepSeek-V3 used is 0.001.
    bias_update_rate: float = 0.0
    # Whether the router keeps an expert_bias buffer for selection. None: the convention above
    # (always for sigmoid, else when bias_update_rate > 0). False: a sigmoid router without one
    # (Llama 4 ranks experts by their plain logits).
    selection_bias: bool | None = None
    # The routing weight scales the expert's input instead of its output (Llama 4:
    # expert(sigmoid(s) * x)); with SwiGLU the two differ.
    gate_input: bool = False
    # Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a token's top_k
    # experts are a fixed table's row for its token id, tid2eid [hash_vocab, top_k], not the best
    # scores; the scores still weight them (DeepSeek-V4's first layers). The layer then needs the
    # token ids. None = learned top-k selection. ModelConfig.hash_layers sets it per layer.
    hash_vocab: int | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "d_expert", "num_experts", "top_k", "num_groups", "topk_groups"):
            check_int(name, getattr(self, name))
        check_int("num_shared_experts", self.num_shared_experts, minimum=0)
        check_choice("router", self.router, ROUTERS)
        check_choice("activation", self.activation, EXPERT_ACTIVATIONS)
        check_bool("router_bias", self.router_bias)
        check_bool("gate_input", self.gate_input)
        if self.selection_bias is not None:
            check_bool("selection_bias", self.selection_bias)
            if not self.selection_bias and self.bias_update_rate > 0:
                raise ConfigError("bias_update_rate > 0 needs the selection bias (selection_bias=False)")
        if self.gate_input and (self.router == "expert_choice" or self.top_k != 1):
            raise ConfigError("gate_input needs token-choice top_k=1 (as Llama 4 routes): one slot per token")
        check_bool("expert_proj_bias", self.expert_proj_bias)
        self._validate_clamp()
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.norm_topk_prob is not None:
            check_bool("norm_topk_prob", self.norm_topk_prob)
        check_bool("shared_expert_gate", self.shared_expert_gate)
        check_float("routed_scaling_factor", self.routed_scaling_factor, 0.0, strict=True)
        if self.capacity_factor is not None:
            check_float("capacity_factor", self.capacity_factor, 0.0, strict=True)
        check_float("router_jitter", self.router_jitter)
        if self.router_jitter >= 1.0:
            raise ConfigError(f"router_jitter must be < 1, got {self.router_jitter}")
        for name in ("load_balance_coef", "seq_balance_coef", "z_loss_coef", "bias_update_rate"):
            check_float(name, getattr(self, name))
        self._validate_groups()
        self._validate_shared()
        if self.router == "expert_choice" and self.bias_update_rate > 0:
            raise ConfigError("bias_update_rate must be 0 for router='expert_choice' (balanced by construction)")
        if self.hash_vocab is not None:
            self._validate_hash()

    def _validate_hash(self) -> None:
        check_int("hash_vocab", self.hash_vocab)
        # The table decides selection: nothing that steers or limits a learned choice applies.
        for name, off in (("router", self.router != "expert_choice"), ("num_groups", self.num_groups == 1),
                          ("bias_update_rate", self.bias_update_rate == 0), ("selection_bias", not self.selection_bias),
                          ("gate_input", not self.gate_input)):
            if not off:
                raise ConfigError(f"{name}={getattr(self, name)!r} does not apply to hash routing (hash_vocab set)")

    def _validate_groups(self) -> None:
        check_choice("group_score", self.group_score, GROUP_SCORES)
        if self.num_groups == 1:
            if self.topk_groups != 1:
                raise ConfigError(f"topk_groups ({self.topk_groups}) needs num_groups > 1")
            return
        if self.router == "expert_choice":
            raise ConfigError("num_groups > 1 (group-limited routing) does not apply to router='expert_choice'")
        if self.num_experts % self.num_groups:
            raise ConfigError(f"num_groups ({self.num_groups}) must divide num_experts ({self.num_experts})")
        if self.group_score == "top2" and self.num_experts // self.num_groups < 2:
            raise ConfigError("num_groups must leave at least 2 experts per group (a group scores by its top 2)")
        if self.topk_groups > self.num_groups:
            raise ConfigError(f"topk_groups ({self.topk_groups}) must be <= num_groups ({self.num_groups})")
        if self.top_k > self.topk_groups * self.group_size:
            raise ConfigError(
                f"top_k ({self.top_k}) must be <= topk_groups * experts per group "
                f"({self.topk_groups} * {self.group_size})"
            )

    def _validate_clamp(self) -> None:
        check_float("swiglu_limit", self.swiglu_limit, 0.0, strict=True)
        check_float("swiglu_alpha", self.swiglu_alpha, 0.0, strict=True)
        # Refused rather than ignored: a config that sets them expects them to act.
        if self.activation not in ("clamped_swiglu", "limited_swiglu") and self.swiglu_limit != 7.0:
            raise ConfigError("swiglu_limit applies only to activation='clamped_swiglu' or 'limited_swiglu'")
        if self.activation != "clamped_swiglu" and self.swiglu_alpha != 1.702:
            raise ConfigError("swiglu_alpha applies only to activation='clamped_swiglu'")
        if self.activation == "clamped_swiglu" and self.num_shared_experts:
            raise ConfigError("activation='clamped_swiglu' is for routed experts; shared experts are not supported with it")

    def _validate_shared(self) -> None:
        if self.d_shared is not None:
            check_int("d_shared", self.d_shared)
            if self.num_shared_experts == 0:
                raise ConfigError("d_shared is set but num_shared_experts is 0")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError("shared_expert_gate needs num_shared_experts >= 1")

    @property
    def group_size(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def renormalize(self) -> bool:
        return self.top_k > 1 if self.norm_topk_prob is None else self.norm_topk_prob

    @property
    def shared_width(self) -> int:
        if self.num_shared_experts == 0:
            return 0
        return self.d_shared if self.d_shared is not None else self.num_shared_experts * self.d_expert

    @property
    def has_selection_bias(self) -> bool:
        if self.hash_vocab is not None:
            return False  # the table selects (V4's hash router has no e_score_correction_bias)
        if self.selection_bias is not None:
            return self.selection_bias
        return self.independent_scores or self.bias_update_rate > 0

    @property
    def act_args(self) -> tuple:
        """Extra arguments of ``mlp.activate`` for this activation (the clamps' limit, alpha)."""
        if self.activation == "clamped_swiglu":
            return (self.swiglu_limit, self.swiglu_alpha)
        return (self.swiglu_limit,) if self.activation == "limited_swiglu" else ()

    @property
    def independent_scores(self) -> bool:
        """Each expert's score stands alone (sigmoid, sqrtsoftplus), rather than a softmax share."""
        return self.router in ("sigmoid", "sqrtsoftplus")

    @property
    def effective_capacity_factor(self) -> float | None:
        if self.router == "expert_choice" and self.capacity_factor is None:
            return 1.0
        return self.capacity_factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        return cls(**check_fields(cls, data))


@dataclass
class CompressionConfig:
    """DeepSeek-V4's attention (transformers' DeepseekV4Attention; DeepSeek-AI 2026, sec. 2.3) for
    ModelConfig(attention="compressed"): one shared key=value head (MQA) over a sliding window,
    plus, per layer, keys compressed from whole windows of tokens. A softmax-gated sum pools
    each window into one entry: "csa" (compressed sparse attention) pools overlapping windows of
    2 * csa_ratio tokens every csa_ratio and lets each query attend only the index_topk entries a
    small "lightning indexer" scores best; "hca" (heavily compressed attention) pools disjoint
    windows of hca_ratio tokens, all attended. The output projection is grouped and low-rank."""

    layers: tuple[str, ...]  # per layer: none (sliding window only) | csa | hca
    csa_ratio: int = 4  # tokens per compressed entry in csa layers (V4: m = 4)
    hca_ratio: int = 128  # ... in hca layers (V4: m' = 128)
    # Compressed layers rotate with their own RoPE base (and scaling: YaRN factor 16 in V4),
    # sliding-only layers with ModelConfig.rope_theta; YaRN here never scales cos/sin (V4's reference).
    rope_theta: float = 160000.0
    rope_scaling: dict[str, Any] | None = None
    o_groups: int = 8  # output projection: heads in o_groups groups, each projected to o_rank...
    o_rank: int = 1024  # ...then the o_groups * o_rank vector mixed to d_model
    index_heads: int = 64  # the lightning indexer's query heads (csa layers)
    index_head_dim: int = 128  # its head width
    index_topk: int = 512  # compressed entries each query keeps (csa layers)

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        for kind in self.layers:
            check_choice("compression.layers entry", kind, KV_COMPRESSIONS)
        for name in ("csa_ratio", "hca_ratio", "o_groups", "o_rank", "index_heads", "index_head_dim", "index_topk"):
            check_int(f"compression.{name}", getattr(self, name))
        check_float("compression.rope_theta", self.rope_theta, 0.0, strict=True)
        rs = self.rope_scaling
        if rs is not None and (not isinstance(rs, dict) or rs.get("rope_type") != "yarn"
                               or not ROPE_SCALINGS["yarn"][0] <= set(rs) - {"rope_type"}
                               or set(rs) - {"rope_type"} - ROPE_SCALINGS["yarn"][0] - ROPE_SCALINGS["yarn"][1]):
            raise ConfigError(f"compression.rope_scaling must be None or YaRN's keys (DeepSeek-V4), got {rs!r}")
        if self.index_head_dim % 2:
            raise ConfigError(f"compression.index_head_dim ({self.index_head_dim}) must be even for rotary embeddings")

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), layers=list(self.layers))


@dataclass
class ModelConfig:
    """A decoder-only transformer whose FFNs are dense or MoE, chosen per layer."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (plain MHA)
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int = 1024  # hidden width of the dense FFN (dense layers, and the whole dense model)
    ffn_activation: str = "swiglu"  # dense FFN activation
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 family
    # RMSNorm on q and k: "head" (per head, Qwen3), "full" (OLMoE), or "l2": per head without a
    # weight, after RoPE, in the layers that use RoPE only (Llama 4's use_qk_norm)
    qk_norm: str | None = None
    sliding_window: int | None = None  # Mistral/Mixtral local attention; None = full causal
    # Chunked attention (Llama 4): a token attends to the earlier tokens of its own chunk of
    # attention_chunk positions (0..C-1, C..2C-1, ...); None = off.
    attention_chunk: int | None = None
    # Layers that attend to the whole causal context even when sliding_window or attention_chunk is
    # set (GPT-OSS alternates sliding and full layers; Llama 4's NoPE layers are global);
    # () = the window or chunk applies to every layer.
    global_layers: tuple[int, ...] = ()
    # Layers without rotary positions (Llama 4 "NoPE" layers, every 4th; Yang et al. 2025, RNoPE).
    nope_layers: tuple[int, ...] = ()
    # Attention temperature tuning in the NoPE layers (Llama 4): q is scaled by
    # 1 + attn_temperature_scale * log(1 + floor((p + 1) / attn_temperature_floor)) at position p,
    # so attention stays sharp at long context; None = off.
    attn_temperature_floor: int | None = None
    attn_temperature_scale: float = 0.1
    out_bias: bool = False  # a bias on the attention output projection (GPT-OSS)
    # A learned logit per head that joins every softmax's denominator, so a head may attend
    # "nowhere" (attention sinks; Xiao et al. 2023, trained in as in gpt-oss).
    attention_sinks: bool = False
    # Context extension of RoPE, e.g. {"rope_type": "yarn", "factor": 40, ...} (DeepSeek-V3),
    # keys as in Hugging Face's rope_scaling (see ROPE_SCALINGS); None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    # Attention: "gqa" (grouped-query; MHA when n_kv_heads = n_heads) or "mla", DeepSeek-V2/V3
    # multi-head latent attention: q and kv pass through low-rank latents, and a small decoupled
    # RoPE part of q/k carries position (DeepSeek-V2 sec. 2.1). The MLA sizes below apply to "mla" only.
    attention: str = "gqa"
    q_lora_rank: int | None = None  # q latent width; None = a full-rank q projection
    kv_lora_rank: int | None = None  # compressed kv latent width (what MLA caches per token)
    qk_nope_head_dim: int | None = None  # per-head q/k width without position
    qk_rope_head_dim: int | None = None  # per-head q/k width that RoPE rotates (k's is shared by heads)
    v_head_dim: int | None = None  # per-head value width
    # attention="compressed" (DeepSeek-V4): its per-layer compression and output projection; it
    # also uses q_lora_rank, head_dim, qk_rope_head_dim (the rotated tail of each head),
    # sliding_window, and n_kv_heads = 1 (one head is both key and value).
    compression: CompressionConfig | None = None
    # Hyper-connections (Zhu et al. 2024; manifold-constrained, DeepSeek-V4 sec. 2.2): the residual
    # is hc_streams parallel streams, mixed into each sublayer's input and back by learned
    # per-token weights, the stream-to-stream mix projected onto doubly-stochastic matrices by
    # hc_sinkhorn_iters Sinkhorn-Knopp steps. 0 = the plain residual. V4: 4 streams, 20 steps.
    hc_streams: int = 0
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    moe: MoEConfig | None = None  # None: a dense model, same class, equal footing
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0 (Qwen decoder_sparse_step)
    first_dense_layers: int = 0  # DeepSeek-V3 first_k_dense_replace
    dense_layers: tuple[int, ...] = ()  # explicit dense layers (Qwen mlp_only_layers)
    # MoE layers whose experts the token id chooses through a fixed table (hash routing, Roller et
    # al. 2021; DeepSeek-V4's first 3 layers): those layers get moe.hash_vocab = vocab_size.
    hash_layers: tuple[int, ...] = ()
    init_std: float = 0.02
    # The Hugging Face architecture this config came from or exports to (e.g. "MixtralForCausalLM");
    # set by moekit.from_pretrained, read by save_pretrained. None for a native moekit model.
    hf_architecture: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if isinstance(self.compression, dict):
            self.compression = CompressionConfig(**check_fields(CompressionConfig, self.compression, "compression"))
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ConfigError(f"moe must be a mapping of MoEConfig fields or null, got {self.moe!r}")
        self.dense_layers = tuple(self.dense_layers)
        self.global_layers = tuple(self.global_layers)
        self.nope_layers = tuple(self.nope_layers)
        self.hash_layers = tuple(self.hash_layers)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "moe_every"):
            check_int(name, getattr(self, name))
        check_int("first_dense_layers", self.first_dense_layers, minimum=0)
        check_choice("ffn_activation", self.ffn_activation, ACTIVATIONS)
        check_float("rope_theta", self.rope_theta, 0.0, strict=True)
        check_float("norm_eps", self.norm_eps, 0.0, strict=True)
        check_float("init_std", self.init_std, 0.0, strict=True)
        check_bool("tie_embeddings", self.tie_embeddings)
        check_bool("qkv_bias", self.qkv_bias)
        check_bool("out_bias", self.out_bias)
        check_bool("attention_sinks", self.attention_sinks)
        if self.qk_norm is not None:
            check_choice("qk_norm", self.qk_norm, QK_NORMS)
        if self.sliding_window is not None:
            check_int("sliding_window", self.sliding_window)
        check_choice("attention", self.attention, ATTENTIONS)
        if self.attention == "mla":
            self._validate_mla()
        else:
            self._validate_heads()
        self._validate_compressed()
        check_int("hc_streams", self.hc_streams, minimum=0)
        check_int("hc_sinkhorn_iters", self.hc_sinkhorn_iters)
        check_float("hc_eps", self.hc_eps, 0.0, strict=True)
        if self.rope_scaling is not None:
            self._validate_rope_scaling()
        if self.hf_architecture is not None and not isinstance(self.hf_architecture, str):
            raise ConfigError(f"hf_architecture must be a string or None, got {self.hf_architecture!r}")
        if self.moe is not None and self.moe.d_model != self.d_model:
            raise ConfigError(f"moe.d_model ({self.moe.d_model}) must equal d_model ({self.d_model})")
        self._validate_llama4_attention()
        for name in ("dense_layers", "global_layers", "nope_layers", "hash_layers"):
            for i in getattr(self, name):
                check_int(f"{name} entry", i, minimum=0)
                if i >= self.n_layers:
                    raise ConfigError(f"{name} entry {i} is out of range for n_layers={self.n_layers}")
        if not_moe := [i for i in self.hash_layers if not self.is_moe_layer(i)]:
            raise ConfigError(f"hash_layers {not_moe} are not MoE layers (only an MoE layer routes)")
        if self.hash_layers and self.moe.hash_vocab is not None:
            raise ConfigError("set hash routing through hash_layers, not moe.hash_vocab (it is per layer)")
        if self.global_layers and self.sliding_window is None and self.attention_chunk is None:
            raise ConfigError("global_layers needs a sliding_window or attention_chunk (every layer is already global)")

    def _validate_llama4_attention(self) -> None:
        if self.attention_chunk is not None:
            check_int("attention_chunk", self.attention_chunk)
            if self.sliding_window is not None:
                raise ConfigError("attention_chunk and sliding_window cannot both be set")
        if self.attn_temperature_floor is not None:
            check_int("attn_temperature_floor", self.attn_temperature_floor)
            if not self.nope_layers:
                raise ConfigError("attn_temperature_floor applies to nope_layers, and there are none")
        check_float("attn_temperature_scale", self.attn_temperature_scale)
        if self.attention == "mla":
            for name in ("attention_chunk", "attn_temperature_floor"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} does not apply to attention='mla'")
            if self.nope_layers:
                raise ConfigError("nope_layers does not apply to attention='mla' (its rope part carries position)")

    def _validate_heads(self) -> None:
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        else:
            check_int("head_dim", self.head_dim)
        if self.n_kv_heads is not None:
            check_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim ({self.resolved_head_dim}) must be even for rotary embeddings")

    def _validate_compressed(self) -> None:
        if self.attention != "compressed":
            if self.compression is not None:
                raise ConfigError("compression applies to attention='compressed' only")
            return
        c = self.compression
        if not isinstance(c, CompressionConfig):
            raise ConfigError("attention='compressed' needs compression (a CompressionConfig)")
        if len(c.layers) != self.n_layers:
            raise ConfigError(f"compression.layers has {len(c.layers)} entries for n_layers={self.n_layers}")
        for name in ("q_lora_rank", "qk_rope_head_dim", "sliding_window"):
            if getattr(self, name) is None:
                raise ConfigError(f"{name} must be set for attention='compressed'")
        if self.kv_heads != 1:
            raise ConfigError(f"attention='compressed' has one shared key/value head; n_kv_heads={self.n_kv_heads}")
        hd = self.resolved_head_dim
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > min(hd, c.index_head_dim):
            raise ConfigError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even and fit head_dim and "
                              "compression.index_head_dim")
        if self.n_heads % c.o_groups:
            raise ConfigError(f"compression.o_groups ({c.o_groups}) must divide n_heads ({self.n_heads})")
        for name in ("qk_norm", "attention_chunk", "rope_scaling"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name} does not apply to attention='compressed'")
        for name in ("qkv_bias", "out_bias", "attention_sinks", "global_layers", "nope_layers"):
            if getattr(self, name):  # sinks are always on; windows and RoPE are per compression kind
                raise ConfigError(f"{name} does not apply to attention='compressed'")

    def _validate_mla(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) is None:
                raise ConfigError(f"{name} must be set for attention='mla'")
            check_int(name, getattr(self, name))
        if self.q_lora_rank is not None:
            check_int("q_lora_rank", self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for rotary embeddings")
        if self.n_kv_heads not in (None, self.n_heads):
            raise ConfigError(
                f"n_kv_heads ({self.n_kv_heads}) does not apply to attention='mla' (every head has its own k and v)"
            )
        for name in ("head_dim", "qk_norm"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name} does not apply to attention='mla'; leave it None")
        for name in ("qkv_bias", "out_bias", "attention_sinks"):
            if getattr(self, name):
                raise ConfigError(f"{name} does not apply to attention='mla'")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if not isinstance(rs, dict):
            raise ConfigError(f"rope_scaling must be a dict or None, got {rs!r}")
        kind = rs.get("rope_type")
        if kind not in ROPE_SCALINGS:
            raise ConfigError(f"rope_scaling.rope_type must be one of {', '.join(ROPE_SCALINGS)}; got {kind!r}")
        required, optional = ROPE_SCALINGS[kind]
        keys = set(rs) - {"rope_type"}
        if missing := sorted(required - keys):
            raise ConfigError(f"rope_scaling ({kind}) lacks {missing}")
        if unknown := sorted(keys - required - optional):
            known = sorted(required | optional)
            raise ConfigError(f"rope_scaling ({kind}) has unknown key(s) {unknown}; known: {known}")
        check_float("rope_scaling.factor", rs["factor"], 0.0, strict=True)

    @property
    def rope_dim(self) -> int:
        """Width that RoPE rotates per head: the whole head, or MLA's decoupled rope part (the
        rotated tail of the head with attention="compressed")."""
        return self.qk_rope_head_dim if self.attention in ("mla", "compressed") else self.resolved_head_dim

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def window_of(self, i: int) -> int | None:
        """Layer i's sliding window (None: full causal attention)."""
        return None if i in self.global_layers else self.sliding_window

    def chunk_of(self, i: int) -> int | None:
        """Layer i's attention chunk (None: not chunked)."""
        return None if i in self.global_layers else self.attention_chunk

    def uses_rope(self, i: int) -> bool:
        return i not in self.nope_layers

    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None or i < self.first_dense_layers or i in self.dense_layers:
            return False
        return (i + 1) % self.moe_every == 0

    def moe_of(self, i: int) -> MoEConfig:
        """Layer i's MoE config: ``moe``, hash-routed over the vocabulary in ``hash_layers`` (where
        the table replaces selection, so the options that steer it, bias and groups, are off)."""
        if i in self.hash_layers:
            return dataclasses.replace(self.moe, hash_vocab=self.vocab_size, selection_bias=None, bias_update_rate=0.0,
                                       num_groups=1, topk_groups=1)
        return self.moe

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        d["global_layers"] = list(self.global_layers)
        d["nope_layers"] = list(self.nope_layers)
        d["hash_layers"] = list(self.hash_layers)
        if self.compression is not None:
            d["compression"] = self.compression.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return cls(**check_fields(cls, data))


__all__ = ["MoEConfig", "ModelConfig", "CompressionConfig", "KV_COMPRESSIONS", "check_fields", "check_int", "check_float", "check_choice", "check_bool", "ROUTERS", "ACTIVATIONS", "EXPERT_ACTIVATIONS", "SWIGLU_KINDS", "GROUP_SCORES", "first_proj_width", "QK_NORMS", "ATTENTIONS", "ROPE_SCALINGS"]
