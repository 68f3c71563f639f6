"""The decoder-only language model: embedding -> blocks -> norm -> logits.

Each block is pre-norm attention then a pre-norm FFN, dense or MoE by ``ModelConfig``'s layer
pattern. A dense model is the same class with ``moe=None``, so dense and MoE are compared on
equal footing. Single-device code: parallelism wraps a built model from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.layers.attention import Attention
from moekit.layers.mla import MLAttention
from moekit.layers.mlp import MLP
from moekit.layers.moe import MoELayer, RoutingStats
from moekit.layers.norms import RMSNorm
from moekit.layers.rope import rope_cache


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, vocab]
    aux_loss: torch.Tensor  # scalar: the weighted balancing losses summed over MoE layers


@dataclass
class LossParts:
    total: torch.Tensor  # what to backpropagate: lm + aux
    lm: torch.Tensor  # mean next-token cross-entropy over non-ignored targets
    aux: torch.Tensor


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.ffn = MoELayer(cfg.moe) if self.is_moe else MLP(cfg.d_model, cfg.d_ff, cfg.ffn_activation)

    def forward(self, x, cos, sin, padding_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, padding_mask) if self.is_moe else self.ffn(h))


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, std) everywhere, residual-output projections scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith(("wo", "w_out"))
                nn.init.normal_(module.weight, std=out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoELayer):
                module.reset_parameters(std, out_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, S] -> logits [B, S, vocab].

        ``attention_mask`` [B, S] (1 = real token) keeps padding out of routing, balancing
        losses and statistics. Attention is causal, so right padding needs no attention mask.
        """
        B, S = input_ids.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = rope_cache(S, self.cfg.rope_dim, self.cfg.rope_theta, input_ids.device, self.cfg.rope_scaling)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, attention_mask)
        logits = self.lm_head(self.norm(x))
        return ModelOutput(logits=logits, aux_loss=self._aux_loss(logits))

    def _aux_loss(self, like: torch.Tensor) -> torch.Tensor:
        aux = like.new_zeros((), dtype=torch.float32)
        for layer in self.moe_layers():
            aux = aux + layer.aux_loss
        return aux

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def routing_stats(self) -> list[RoutingStats | None]:
        """``last_stats`` of every MoE layer, in depth order."""
        return [layer.last_stats for layer in self.moe_layers()]

    def update_expert_bias(self) -> None:
        """One aux-loss-free balancing step in every MoE layer (call once per optimizer step)."""
        for layer in self.moe_layers():
            layer.update_expert_bias()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def save_pretrained(self, path, **kwargs) -> None:
        """Write a Hugging Face model folder (config.json + safetensors) that transformers loads;
        see ``moekit.interop.hf.save_pretrained`` for the options."""
        from moekit.interop.hf import save_pretrained

        save_pretrained(self, path, **kwargs)


def lm_loss(out: ModelOutput, targets: torch.Tensor, ignore_index: int = -100) -> LossParts:
    """Next-token cross-entropy (targets [B, S], already shifted) plus the MoE balancing losses."""
    lm = F.cross_entropy(
        out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )
    return LossParts(total=lm + out.aux_loss, lm=lm, aux=out.aux_loss)
