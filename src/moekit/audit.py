"""Published parameter claims against moekit's count: the "total vs active" blur made concrete.

Two kinds of model are audited:
- moekit's full-size presets (decoder-only, buildable), counted by ``accounting.count_params``;
- models moekit cannot build (no transformers class, or encoder-decoder), described by a
  ``PaperConfig`` with the shapes their paper, open-weights release or a rumour gives, and
  counted here. ``PaperConfig`` is plain data for accounting only; it never becomes a model.

Conventions are accounting.py's: active = everything a token touches, embedding and output
matrices included, with k of E routed experts per MoE layer. For an encoder-decoder, a token is
counted through both stacks (encoder and decoder, cross-attention included).
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.accounting import ParamCount, count_params, human, weight_bytes
from moekit.presets import get_preset

STATUSES = ("paper", "open weights", "rumour")


@dataclass(frozen=True)
class PaperConfig:
    """The shape of a published (or rumoured) MoE, enough to count its parameters."""

    description: str
    status: str  # "paper" | "open weights" | "rumour": how much to trust the shape
    source: str  # where the shape and the claim come from
    vocab_size: int
    d_model: int
    n_heads: int
    head_dim: int  # T5's d_kv; d_model / n_heads for most decoders
    d_ff: int  # hidden width of every FFN, dense or expert
    num_experts: int
    top_k: int
    decoder_layers: int
    encoder_layers: int = 0  # >0: a T5-style encoder-decoder (Switch, GShard)
    moe_every: int = 1  # 2: every other FFN is an MoE layer (Switch, GShard), as in T5X: layers 1, 3, ...
    n_kv_heads: int | None = None  # None: n_heads (multi-head attention)
    gated: bool = True  # 3 FFN matrices (SwiGLU/GEGLU) instead of 2 (ReLU/GELU)
    tie_embeddings: bool = False  # output projection shares the input embedding
    relative_attention_buckets: int = 0  # T5 relative position bias in each stack's first self-attention
    claimed_total: float | None = None
    claimed_active: float | None = None
    notes: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        for name in ("vocab_size", "d_model", "n_heads", "head_dim", "d_ff", "num_experts", "top_k",
                     "decoder_layers", "moe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.encoder_layers < 0:
            raise ValueError(f"encoder_layers must be >= 0, got {self.encoder_layers}")


def _ffn(p: PaperConfig) -> int:
    return (3 if p.gated else 2) * p.d_model * p.d_ff


def _attention(p: PaperConfig) -> int:
    q = p.n_heads * p.head_dim
    kv = (p.n_kv_heads or p.n_heads) * p.head_dim
    return p.d_model * (q + 2 * kv) + q * p.d_model


def _stack(p: PaperConfig, layers: int, cross_attention: bool) -> dict[str, int]:
    """Parameters of one stack by category; MoE layers sit at 1, 1 + moe_every, ... (all when 1)."""
    n_moe = sum(1 for i in range(layers) if p.moe_every == 1 or i % p.moe_every == 1)
    attn_blocks = 2 if cross_attention else 1
    return {
        "attention": layers * attn_blocks * _attention(p) + p.relative_attention_buckets * p.n_heads,
        "norms": p.d_model * (layers * (attn_blocks + 1) + 1),
        "dense_ffn": (layers - n_moe) * _ffn(p),
        "router": n_moe * p.num_experts * p.d_model,
        "routed_experts": n_moe * p.num_experts * _ffn(p),
    }


def count_paper_params(p: PaperConfig) -> ParamCount:
    """Total and active parameters of ``p``: embeddings, (encoder,) decoder, output projection."""
    total = {"embeddings": p.vocab_size * p.d_model, "lm_head": 0 if p.tie_embeddings else p.vocab_size * p.d_model}
    stacks = [_stack(p, p.decoder_layers, cross_attention=p.encoder_layers > 0)]
    if p.encoder_layers:
        stacks.append(_stack(p, p.encoder_layers, cross_attention=False))
    for s in stacks:
        for k, v in s.items():
            total[k] = total.get(k, 0) + v
    active = dict(total, routed_experts=total["routed_experts"] * p.top_k // p.num_experts)
    return ParamCount(sum(total.values()), sum(active.values()), total, active)


def paper_flops_per_token(p: PaperConfig) -> float:
    """Forward FLOPs per token, 2 per active matmul weight (output projection included, embedding
    lookup and norms not); the attention-score term, which depends on context, is left out."""
    a = count_paper_params(p).active_breakdown
    return 2.0 * (a["attention"] + a["dense_ffn"] + a["router"] + a["routed_experts"] + p.vocab_size * p.d_model)


_SWITCH = "Fedus, Zoph & Shazeer 2021, Switch Transformers (arXiv:2101.03961)"
_T5 = dict(vocab_size=32128, n_heads=12, head_dim=64, top_k=1, moe_every=2, gated=False, tie_embeddings=True,
           relative_attention_buckets=32)

PAPER_MODELS: dict[str, PaperConfig] = {
    "switch-base-8": PaperConfig(
        "Switch-Base, 8 experts top-1, T5-Base encoder-decoder, every other FFN an MoE", "open weights",
        f"{_SWITCH}; google/switch-base-8 config.json", d_model=768, d_ff=3072, num_experts=8,
        decoder_layers=12, encoder_layers=12, **_T5,
        notes="no published total; checked against transformers' SwitchTransformers on the meta device",
    ),
    "switch-base-128": PaperConfig(
        "Switch-Base, 128 experts top-1", "open weights", f"{_SWITCH}, Table 9 (Switch-Base: 7B); "
        "google/switch-base-128 config.json", d_model=768, d_ff=3072, num_experts=128,
        decoder_layers=12, encoder_layers=12, claimed_total=7e9, **_T5,
        notes="the paper rounds to one digit: 7.4B is '7B'",
    ),
    "switch-large-128": PaperConfig(
        "Switch-Large, 128 experts top-1, T5-Large shape", "open weights", f"{_SWITCH}, Table 9 (Switch-Large: 26B); "
        "google/switch-large-128", d_model=1024, d_ff=4096, num_experts=128, decoder_layers=24,
        encoder_layers=24, claimed_total=26e9, **{**_T5, "n_heads": 16},
    ),
    "switch-xxl-128": PaperConfig(
        "Switch-XXL, 128 experts top-1, T5-XXL (v1.1) shape with GEGLU", "open weights",
        f"{_SWITCH}, Table 9 (Switch-XXL: 395B); google/switch-xxl-128", d_model=4096, d_ff=10240, num_experts=128,
        decoder_layers=24, encoder_layers=24, claimed_total=395e9,
        **{**_T5, "n_heads": 64, "gated": True, "tie_embeddings": False},
    ),
    "switch-c-2048": PaperConfig(
        "Switch-C, 2048 experts top-1 in every FFN layer, 15 + 15 layers", "open weights",
        f"{_SWITCH}, Table 9 (Switch-C: 1571B, the '1.6 trillion'); google/switch-c-2048", d_model=2080,
        d_ff=6144, num_experts=2048, decoder_layers=15, encoder_layers=15, claimed_total=1571e9,
        **{**_T5, "n_heads": 30, "moe_every": 1},
        notes="the paper's 15 layers per stack; google/switch-c-2048's config.json says 12 decoder layers",
    ),
    "gshard-600b": PaperConfig(
        "GShard MoE(2048E, 36L): 2048 experts top-2, every other FFN, 18 + 18 layers", "paper",
        "Lepikhin et al. 2020, GShard (arXiv:2006.16668), Table 3 / sec. 4 (600B)", vocab_size=64000, d_model=1024,
        n_heads=16, head_dim=64, d_ff=8192, num_experts=2048, top_k=2, decoder_layers=18, encoder_layers=18,
        moe_every=2, gated=False, claimed_total=600e9,
        notes="36L read as 36 layers in all (18 encoder + 18 decoder); the vocabulary (64k) is assumed",
    ),
    "grok-1": PaperConfig(
        "Grok-1: 8 experts top-2 in every layer, 64 layers, GQA 48/8", "open weights",
        "xAI, github.com/xai-org/grok-1 (model.py and README: 314B)", vocab_size=131072, d_model=6144, n_heads=48,
        n_kv_heads=8, head_dim=128, d_ff=32768, num_experts=8, top_k=2, decoder_layers=64, tie_embeddings=True,
        claimed_total=314e9,
        notes="Grok-1 has 4 RMSNorms per layer; 2 are counted (the other 2 are 0.8M parameters)",
    ),
    "gpt-4-rumoured": PaperConfig(
        "GPT-4 AS RUMOURED, not a fact: 16 experts of ~111B top-2, 120 layers, ~55B shared attention",
        "rumour", "SemiAnalysis / leaked reports, July 2023 (~1.8T total, ~280B per forward pass); OpenAI has "
        "published no architecture", vocab_size=100256, d_model=10752, n_heads=84, head_dim=128, d_ff=43008,
        num_experts=16, top_k=2, decoder_layers=120, gated=False, claimed_total=1.8e12, claimed_active=280e9,
        notes="widths chosen here to fit the rumoured totals (4x GELU FFN), so agreement is by construction",
    ),
}

# Published totals and active counts of moekit's full-size presets, rounded by their publishers.
PRESET_CLAIMS: dict[str, tuple[float, float, str, str]] = {
    "mixtral-8x7b": (46.7e9, 12.9e9, "Jiang et al. 2024, Mixtral of Experts", ""),
    "mixtral-8x22b": (141e9, 39e9, "Mistral AI, Mixtral 8x22B announcement", ""),
    "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9, "Qwen team, Qwen1.5-MoE blog", ""),
    "olmoe-1b-7b": (6.9e9, 1.3e9, "Muennighoff et al. 2024, OLMoE", ""),
    "qwen3-30b-a3b": (30.5e9, 3.3e9, "Qwen team, Qwen3 model card", ""),
    "deepseek-v3": (671e9, 37e9, "DeepSeek-AI 2024, DeepSeek-V3 technical report",
                    "claims exclude the 14B multi-token-prediction module, as moekit does"),
    "deepseek-r1": (671e9, 37e9, "DeepSeek-AI 2025, DeepSeek-R1 (arXiv:2501.12948; the V3 architecture)",
                    "claims exclude the 14B multi-token-prediction module, as moekit does"),
    "deepseek-v2": (236e9, 21e9, "DeepSeek-AI 2024, DeepSeek-V2 (arXiv:2405.04434)", ""),
    "deepseek-v4": (284e9, 13e9, "DeepSeek-AI 2026, DeepSeek-V4-Flash model card (284B total, 13B activated)",
                    "shape: transformers' DeepseekV4Config defaults; both exclude the MTP module; moekit's active "
                    "count less the input embedding (0.53B) is 13.26B"),
    "deepseek-v2-lite": (15.7e9, 2.4e9, "DeepSeek-AI 2024, DeepSeek-V2 (arXiv:2405.04434), appendix B",
                         "moekit's active count less the input embedding (0.21B) is 2.45B: the claim seems to leave it out"),
    "llama4-scout": (109e9, 17e9, "Meta 2025, Llama 4 model card (Scout: 17B active, 109B total)",
                     "the claim includes the vision encoder, which moekit does not count (text model only)"),
    "llama4-maverick": (400e9, 17e9, "Meta 2025, Llama 4 model card (Maverick: 17B active, 400B total)",
                        "the claim includes the vision encoder, which moekit does not count (text model only)"),
    "gpt-oss-20b": (20.91e9, 3.61e9, "OpenAI 2025, gpt-oss-120b & gpt-oss-20b model card, Table 1",
                    "the card counts the unembedding but not the embedding as active; moekit counts both"),
    "gpt-oss-120b": (116.83e9, 5.13e9, "OpenAI 2025, gpt-oss-120b & gpt-oss-20b model card, Table 1",
                     "the card counts the unembedding but not the embedding as active; moekit counts both"),
}


@dataclass(frozen=True)
class AuditRow:
    name: str
    status: str
    claimed_total: float | None
    claimed_active: float | None
    total: int
    active: int
    source: str
    notes: str


def _pct(ours: float, claim: float | None) -> str:
    return "—" if claim is None else f"{100 * (ours - claim) / claim:+.1f}%"


def _claim(x: float | None) -> str:
    return "—" if x is None else human(x)


def audit_rows() -> list[AuditRow]:
    rows = []
    for name, (total, active, source, notes) in PRESET_CLAIMS.items():
        pc = count_params(get_preset(name))
        rows.append(AuditRow(name, "preset", total, active, pc.total, pc.active, source, notes))
    for name, p in PAPER_MODELS.items():
        pc = count_paper_params(p)
        rows.append(AuditRow(name, p.status, p.claimed_total, p.claimed_active, pc.total, pc.active, p.source, p.notes))
    return rows


def audit_table() -> str:
    """The Markdown table in docs/audits.md (``moekit inspect --audit`` prints it)."""
    lines = [
        "| model | kind | claimed total | moekit total | diff | claimed active | moekit active | diff | source; notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in audit_rows():
        note = f"{r.source}; {r.notes}" if r.notes else r.source
        lines.append(
            f"| {r.name} | {r.status} | {_claim(r.claimed_total)} | {human(r.total)} | {_pct(r.total, r.claimed_total)} "
            f"| {_claim(r.claimed_active)} | {human(r.active)} | {_pct(r.active, r.claimed_active)} | {note} |"
        )
    return "\n".join(lines)


def paper_summary(name: str) -> dict:
    """``moekit inspect <paper model> --json``: the numbers of ``format_paper_report``."""
    p = PAPER_MODELS[name]
    pc = count_paper_params(p)
    return {
        "name": name, "status": p.status, "source": p.source, "notes": p.notes,
        "claimed_total": p.claimed_total, "claimed_active": p.claimed_active,
        "total_params": pc.total, "active_params": pc.active, "active_fraction": pc.active / pc.total,
        "breakdown": pc.breakdown, "active_breakdown": pc.active_breakdown,
        "forward_flops_per_token": paper_flops_per_token(p), "weight_bytes": weight_bytes(pc.total),
    }


def format_paper_report(name: str) -> str:
    """``moekit inspect <paper model>``: counts, FLOPs per token and weight memory."""
    p = PAPER_MODELS[name]
    pc = count_paper_params(p)
    label = "A RUMOUR, not a published fact" if p.status == "rumour" else f"from the {p.status}"
    stacks = f"{p.encoder_layers} encoder + {p.decoder_layers} decoder layers" if p.encoder_layers \
        else f"{p.decoder_layers} decoder layers"
    lines = [
        f"{name}  ({label})",
        f"  {p.description}",
        f"  source: {p.source}",
        f"  shape              {stacks}, {p.num_experts} experts top-{p.top_k}",
        f"  total parameters   {human(pc.total):>10}  ({pc.total:,}; claimed {_claim(p.claimed_total)}, "
        f"{_pct(pc.total, p.claimed_total)})",
        f"  active per token   {human(pc.active):>10}  ({pc.active:,}, {100 * pc.active / pc.total:.1f}% of total; "
        f"claimed {_claim(p.claimed_active)})",
        f"  forward FLOPs/token {human(paper_flops_per_token(p)):>9}  (2 per active matmul weight; attention "
        "scores not included)",
        "  weight memory      " + "  ".join(f"{k} {human(v, 'B')}" for k, v in weight_bytes(pc.total).items()),
    ]
    if p.notes:
        lines.append(f"  note: {p.notes}")
    return "\n".join(lines)
