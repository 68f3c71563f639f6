"""What an architecture family tells the converter: its names, and its config in both directions.

A ``Family`` holds plain functions (no class per architecture): ``to_config`` reads a Hugging
Face config.json dict into a ``ModelConfig``, ``to_hf`` writes one back. The helpers below read
the fields that every Llama-lineage config shares, with the defaults of transformers' config
classes where a published config.json leaves a key out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from moekit.config import ROPE_SCALINGS, ModelConfig
from moekit.errors import ConfigError

HFConfig = dict[str, Any]
MISSING = object()
# Keys that transformers' attribute_map makes interchangeable (transformers 5 writes
# Qwen3-MoE's num_experts as num_local_experts, DeepSeek-V3's MTP depth as num_mtp_layers).
ALIASES: dict[str, tuple[str, ...]] = {
    "num_experts": ("num_local_experts",),
    "num_local_experts": ("num_experts", "n_routed_experts"),
    "n_routed_experts": ("num_local_experts",),
    "num_nextn_predict_layers": ("num_mtp_layers",),
}


@dataclass(frozen=True)
class Naming:
    """Where a family keeps its FFN tensors under ``model.layers.{i}``."""

    moe: str = "mlp"  # MoE module in the published per-expert layout (Mixtral: block_sparse_moe)
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down
    shared: str = "shared_expert"  # shared-expert module (DeepSeek: shared_experts)
    router: str = "gate"  # router module under the MoE module (GPT-OSS: router)
    dense: str = "mlp"  # dense FFN module (Llama 4: feed_forward)


@dataclass(frozen=True)
class Family:
    architectures: tuple[str, ...]  # the "architectures" entries this family reads and writes
    model_type: str
    to_config: Callable[[HFConfig], ModelConfig]
    to_hf: Callable[[ModelConfig], HFConfig]  # the semantic keys only; hf.py merges them into a base
    naming: Naming = field(default_factory=Naming)
    # Optional per-tensor row permutation: (moekit suffix, cfg, hf config) -> permutation or None.
    row_permutation: Callable | None = None
    # Checkpoint names to skip with a note (DeepSeek-V3's multi-token-prediction layers), and the note.
    skipped: Callable[[str, ModelConfig], bool] | None = None
    skip_note: str = "multi-token-prediction tensor(s) (model.layers.{n_layers}.*): they are not part of the language model"
    prefix: str = ""  # before every checkpoint name (Llama 4's multimodal checkpoints: "language_model.")
    fp32_router: bool = False  # transformers keeps the router weight/bias in fp32 (DeepSeek-V3)
    # moekit modules (name endings) kept float32 in a half-precision load and export, as transformers
    # keeps them (DeepSeek-V4's hyper-connections); they compute in float32 whatever the input.
    fp32_modules: tuple[str, ...] = ()
    # Optional own expert layout: (which of w_in/w_out/b_in/b_out, moekit shape, "...experts." prefix)
    # -> pieces (GPT-OSS's transposed, interleaved fused tensors with biases); None = names.py's.
    expert_pieces: Callable | None = None
    # Optional own name tables (global names, per-block suffixes) in names.py's rule format,
    # replacing its Llama-lineage ones (DeepSeek-V4's checkpoints keep DeepSeek's own names).
    tables: tuple[dict, dict] | None = None
    # Optional second spelling of every checkpoint name, tried on load (DeepSeek-V4: the release's
    # names without transformers' "model." prefix); exports write the first.
    respell: Callable[[str], str] | None = None


class Fields:
    """Reads a config.json dict; a missing or null key takes the family's default."""

    def __init__(self, hf: HFConfig, defaults: dict[str, Any], label: str):
        self.hf, self.defaults, self.label = hf, defaults, label

    def __call__(self, key: str, default: Any = MISSING) -> Any:
        like = default if default is not MISSING else self.defaults.get(key, MISSING)
        for k in (key, *ALIASES.get(key, ())):
            if self.hf.get(k) is not None:
                return self.typed(k, self.hf[k], like)
        if default is not MISSING:
            return default
        if key in self.defaults:
            return self.defaults[key]
        raise ConfigError(f"{self.label} config.json lacks {key!r}")

    def typed(self, key: str, value: Any, like: Any = MISSING) -> Any:
        """``value`` when it has the kind of ``like`` (a number when there is no default: every
        key read without one is a size or count); a ConfigError naming the key otherwise. A
        hand-edited config.json with "64" for hidden_size must not fail deep inside the model."""
        kind = _kind(like) if like is not MISSING and like is not None else "a number"
        if _kind(value) != kind:
            raise ConfigError(f"{self.label} config.json: {key} must be {kind}, got {value!r}")
        return value

    def reject(self, key: str, allowed: Any, why: str) -> None:
        """Raise when ``key`` is set to something moekit cannot reproduce exactly."""
        value = self.hf.get(key)
        if value is not None and value != allowed:
            raise ConfigError(f"{self.label}: {key}={value!r} is not supported ({why})")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, (list, tuple)) else type(value).__name__


def architecture_of(hf: HFConfig) -> str:
    archs = hf.get("architectures") or []
    return archs[0] if archs else str(hf.get("model_type"))


def llama_fields(f: Fields, arch: str) -> dict[str, Any]:
    """ModelConfig keyword arguments shared by the Llama-lineage families (GQA attention)."""
    if (act := f("hidden_act", "silu")) != "silu":
        raise ConfigError(f"{f.label}: hidden_act={act!r} is not supported (moekit's FFNs are SwiGLU)")
    n_heads, d_model = f("num_attention_heads"), f("hidden_size")
    if "num_key_value_heads" in f.hf:  # null means one kv head per q head, as transformers reads it
        kv = f.hf["num_key_value_heads"] or n_heads
    else:  # absent: the config class's default (8 for Mixtral/Mistral, 4 for Qwen3-MoE)
        kv = f.defaults.get("num_key_value_heads", n_heads)
    head_dim = f.hf.get("head_dim")
    theta, scaling = rope_from_hf(f)
    return dict(
        vocab_size=f("vocab_size"),
        d_model=d_model,
        n_layers=f("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=None if kv == n_heads else kv,
        head_dim=None if head_dim == d_model // n_heads else head_dim,  # spelled out or derived: the same model
        d_ff=f("intermediate_size"),
        max_seq_len=f("max_position_embeddings"),
        rope_theta=float(theta),
        rope_scaling=scaling,
        norm_eps=float(f("rms_norm_eps")),
        tie_embeddings=bool(f("tie_word_embeddings", False)),
        init_std=float(f("initializer_range", 0.02)),
        hf_architecture=arch,
    )


def rope_from_hf(f: Fields) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, moekit rope_scaling) from ``rope_parameters`` (transformers 5) or the legacy
    ``rope_theta`` + ``rope_scaling`` keys; unsupported schemes are a clear error."""
    params = dict(f.hf.get("rope_parameters") or {})
    legacy = dict(f.hf.get("rope_scaling") or {})
    if params and not any(k in params for k in ("rope_type", "type", "rope_theta")):
        raise ConfigError(f"{f.label}: per-layer-type rope_parameters are not supported")
    theta = f.typed("rope_theta", params.pop("rope_theta", None) or f("rope_theta"))
    merged = {**legacy, **params}
    kind = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if merged.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{f.label}: partial_rotary_factor is not supported")
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALINGS:
        raise ConfigError(
            f"{f.label}: rope scaling type {kind!r} is not supported; supported: default, {', '.join(ROPE_SCALINGS)}"
        )
    required, optional = ROPE_SCALINGS[kind]
    if "original_max_position_embeddings" in required:  # transformers fills it in the same way
        merged.setdefault("original_max_position_embeddings", f("max_position_embeddings"))
    scaling = {k: v for k, v in merged.items() if k in required | optional}
    return theta, {"rope_type": kind, **scaling}


def rope_to_hf(cfg: ModelConfig) -> HFConfig:
    """transformers 5's ``rope_parameters``; hf.py rewrites it as legacy keys for a legacy base."""
    params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        params.update(cfg.rope_scaling)
    return {"rope_parameters": params}


def llama_to_hf(cfg: ModelConfig, arch: str, model_type: str) -> HFConfig:
    out: HFConfig = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        **rope_to_hf(cfg),
    }
    if cfg.head_dim is not None:
        out["head_dim"] = cfg.head_dim
    return out


class Representable:
    """Collects what a target architecture cannot express, then raises once, listing it all."""

    def __init__(self, cfg: ModelConfig, arch: str):
        self.cfg, self.arch, self.problems = cfg, arch, []

    def need(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)

    def attention(self, qkv_bias: bool = False, qk_norm: str | None = None, sliding: bool = True,
                  out_bias: bool = False, sinks: bool = False, per_layer_window: bool = False) -> None:
        c = self.cfg
        self.need(c.attention == "gqa", f"attention={c.attention!r}")
        self.need(c.qkv_bias == qkv_bias, f"qkv_bias={c.qkv_bias}")
        self.need(c.out_bias == out_bias, f"out_bias={c.out_bias}")
        self.need(c.attention_sinks == sinks, f"attention_sinks={c.attention_sinks}")
        self.need(c.qk_norm == qk_norm, f"qk_norm={c.qk_norm!r}")
        self.need(sliding or c.sliding_window is None, f"sliding_window={c.sliding_window}")
        self.need(per_layer_window or not c.global_layers, f"global_layers={list(c.global_layers)}")
        self.need(c.ffn_activation == "swiglu", f"ffn_activation={c.ffn_activation!r}")

    def moe(self, router: str, shared: bool = False, gated_shared: bool = False, activation: str = "swiglu",
            biases: bool = False) -> None:
        m = self.cfg.moe
        if m is None:
            self.problems.append("a dense model (moe=None)")
            return
        self.need(m.router == router, f"router={m.router!r}")
        self.need(m.activation == activation, f"moe.activation={m.activation!r}")
        self.need(m.router_bias == biases, f"router_bias={m.router_bias}")
        self.need(m.expert_proj_bias == biases, f"expert_proj_bias={m.expert_proj_bias}")
        self.need(m.capacity_factor is None, f"capacity_factor={m.capacity_factor} (the target is dropless)")
        self.need(
            router == "sigmoid" or not m.has_selection_bias,
            f"an expert selection bias (bias_update_rate={m.bias_update_rate})",
        )
        self.need(shared or m.num_shared_experts == 0, f"num_shared_experts={m.num_shared_experts}")
        self.need(not shared or m.num_shared_experts >= 1, "no shared expert (the target always has one)")
        self.need(m.shared_expert_gate == gated_shared, f"shared_expert_gate={m.shared_expert_gate}")

    def dense(self) -> None:
        self.need(self.cfg.moe is None, "MoE layers (the target is a dense architecture)")

    def check(self) -> None:
        if self.problems:
            raise ConfigError(f"{self.arch} cannot represent this model: {'; '.join(self.problems)}")


__all__ = [
    "Family", "Naming", "Fields", "HFConfig", "Representable", "architecture_of",
    "llama_fields", "llama_to_hf", "rope_from_hf", "rope_to_hf",
]
