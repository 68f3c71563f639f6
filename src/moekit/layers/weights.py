"""The expert-weights provider: the one place expert compute gets its weights from.

Shape legend: D model dim, F expert hidden width, H first-projection width (2F for SwiGLU,
gate rows first, else F), E experts held here.

Expert compute (``experts.py``) never reads a weight tensor by name; it asks its provider:
- ``get(ids, dtype)``: the listed experts' matrices in the compute dtype, as
  (w_in [H, D], w_out [D, F]) pairs in [out, in] layout. Decode asks only for the experts its
  tokens were routed to, so a provider that stores weights elsewhere (an offload cache over
  disk or RAM) fetches just those.
- ``stacked()``: every expert's weights as two stacked tensors [E, H, D] and [E, D, F], in
  their storage dtype. When ``plain`` is True these are the trainable parameters themselves,
  and the layer may hand them to the fused local fast path (``grouped_mm.py``).
- ``rows(x_MD, counts, weights_M, impl)``: the experts on dispatched rows (the general path).
- the local entries ``forward(x_TD, plan, impl)`` -> [T, D] fp32 and ``single_token(x_1D,
  ids_1K, weights_1K)``, which the layer calls with the local dispatcher:
  ``experts.local_experts`` and ``experts.single_token`` implement them for any provider.

``experts.Experts`` is today's provider: two 3-D parameters, ``w_in`` and ``w_out`` (their
state-dict names are part of the checkpoint and interop formats). Later providers are
twins that replace it after loading, as gpt-fast swaps in quantized modules: int8/int4 weights
with scales (``plain`` False; ``get`` dequantizes, or a quantized compute takes the raw
tensors), an offload cache (``get`` fetches), base + LoRA (``get`` adds the low-rank term, or
``plain`` stays True with a separate adapter term). Expert ids are local: in [0, E) for the E
experts this provider holds, which under expert parallelism are the global experts
[first_expert, first_expert + E) (``docs/design.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moekit.errors import ConfigError
from moekit.layers.grouped_act import ACTIVATIONS



class ExpertWeights(nn.Module):
    """The provider interface. Subclasses hold the weights in whatever form they like."""

    plain = False  # True: stacked() returns the parameters themselves (the fused path may take them)
    first_expert = 0  # global id of local expert 0 (expert parallelism shards the experts)
    has_bias = False  # True: ``biases`` gives each expert's projection biases (GPT-OSS)
    act_args: tuple = ()  # extra arguments of ``mlp.activate`` (the clamped SwiGLUs' limit, alpha)

    def __init__(self, num_experts: int, d_model: int, d_expert: int, activation: str):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.activation = activation

    def get(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(w_in [H, D], w_out [D, F]) in ``dtype`` for each local expert id, in order."""
        raise NotImplementedError

    def biases(self, ids: Sequence[int], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(b_in [H], b_out [D]) in ``dtype`` for each local expert id; only when ``has_bias``."""
        raise NotImplementedError

    @property
    def grouped_ok(self) -> bool:
        """Whether the grouped node (``grouped_mm.py``) computes these experts: every activation
        of ``grouped_act.py``, with or without biases; others take the per-expert loop."""
        return self.activation in ACTIVATIONS

    def stacked_biases(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every expert's biases, b_in [E, H] and b_out [E, D], or (None, None) without
        (``has_bias`` False). The default stacks ``biases``."""
        if not self.has_bias:
            return None, None
        pairs = self.biases(range(self.num_experts), self.dtype)
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

    @property
    def limit(self) -> float | None:
        """limited_swiglu's clamp, as the grouped node takes it (None for other activations)."""
        return self.act_args[0] if self.activation == "limited_swiglu" else None

    def rows(self, x_MD: torch.Tensor, counts: torch.Tensor, weights_M: torch.Tensor,
             impl: str = "grouped") -> torch.Tensor:
        """These experts on dispatched rows -> y_MD [M, D] fp32; implementations return
        ``experts.expert_rows(self, ...)``. The layer's general path enters here (a method
        of the module, not a free function), so that a provider which is its own FSDP unit
        (expert parallelism) can register ``rows`` as a forward method and have its
        parameters gathered around every read (``register_fsdp_forward_method``)."""
        raise NotImplementedError

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert: w_in [E, H, D], w_out [E, D, F]. The default stacks ``get``."""
        pairs = self.get(range(self.num_experts), self.dtype)
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype compute runs in when the activations do not say otherwise."""
        return torch.float32


def require_plain_ffn(weights: ExpertWeights, what: str) -> None:
    """Refuse a tool that rewrites expert weights (expert parallelism) on experts with biases
    or a parametrized activation (GPT-OSS, DeepSeek-V4): its twin holds w_in and w_out and
    computes the plain activations only, and dropping the rest would change the model without
    a word. The message names what these experts have and whose experts those are. (Quantized,
    offloaded and LoRA twins carry both: ``quant/modules.py``, ``offload/experts.py``,
    ``adapt/lora_experts.py``.)"""
    if not (weights.has_bias or weights.act_args):
        return
    have = (["projection biases (b_in, b_out)"] if weights.has_bias else []) + (
        [f"activation={weights.activation!r} with arguments {tuple(weights.act_args)}"] if weights.act_args else [])
    family = _FAMILIES.get((weights.has_bias, weights.activation), "")
    raise ConfigError(f"{what} does not support experts with {' and '.join(have)}{family}; quantization, "
                      "expert offloading and LoRA do")


# which published experts have these features (for the refusal's message)
_FAMILIES = {(True, "clamped_swiglu"): " (GPT-OSS's experts)", (False, "limited_swiglu"): " (DeepSeek-V4's experts)"}


__all__ = ["ExpertWeights", "require_plain_ffn"]
