"""The decoder-only language model: embedding -> blocks -> norm -> logits.

Each block is pre-norm attention then a pre-norm FFN, dense or MoE by ``ModelConfig``'s layer
pattern. A dense model is the same class with ``moe=None``, so dense and MoE are compared on
equal footing. Single-device code: parallelism wraps a built model from outside.

Generation passes a ``CacheView`` (layers/kv_cache.py): the rows' cache slots and positions.
That is all the model learns of it; prefill and decode are the same forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.layers.attention import Attention
from moekit.layers.compressed_attention import CompressedAttention
from moekit.layers.hyper_connections import HyperConnection, HyperHead
from moekit.layers.kv_cache import CacheView
from moekit.layers.mla import MLAttention
from moekit.layers.mlp import MLP
from moekit.layers.moe import MoELayer, RoutingStats
from moekit.layers.norms import RMSNorm
from moekit.layers.rope import rope_cache


class ModelOutput:
    """logits [B, S, vocab] and ``aux_loss``, the weighted balancing losses summed over MoE
    layers (a scalar), computed when first read so that generation does not pay for them.
    The layers keep only their last forward's routing, so read it before the next forward."""

    def __init__(self, logits: torch.Tensor, model: MoETransformer):
        self.logits = logits
        self._model, self._forward_id, self._aux = model, model._forward_count, None

    @property
    def aux_loss(self) -> torch.Tensor:
        if self._aux is None:
            if self._model._forward_count != self._forward_id:
                raise RuntimeError("aux_loss of an older forward: read it before running the model again")
            self._aux = self._model._aux_loss(self.logits)
        return self._aux


@dataclass
class LossParts:
    total: torch.Tensor  # what to backpropagate: lm + aux
    lm: torch.Tensor  # mean next-token cross-entropy over non-ignored targets
    aux: torch.Tensor


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.attention == "mla":
            self.attn = MLAttention(cfg)
        elif cfg.attention == "compressed":  # DeepSeek-V4
            self.attn = CompressedAttention(cfg, layer_id)
        else:
            self.attn = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.layer_id = layer_id
        self.ffn = MoELayer(cfg.moe_of(layer_id)) if self.is_moe else MLP(cfg.d_model, cfg.d_ff, cfg.ffn_activation)

    def forward(self, x, cos, sin, padding_mask=None, cache: CacheView | None = None, input_ids=None):
        """``input_ids`` [B, S] reach the MoE layer, which a hash-routed layer chooses experts by."""
        x = x + self.attn(self.attn_norm(x), cos, sin, None if cache is None else cache.layer(self.layer_id))
        h = self.ffn_norm(x)
        return x + (self.ffn(h, padding_mask, input_ids) if self.is_moe else self.ffn(h))


class HyperBlock(Block):
    """A block on hyper-connection streams x [B, S, N, D] (``hyper_connections.py``): each sublayer
    reads a learned mix of the streams and writes back into all of them (DeepSeek-V4)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        hc = (cfg.d_model, cfg.hc_streams, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps)
        self.attn_hc, self.ffn_hc = HyperConnection(*hc), HyperConnection(*hc)

    def forward(self, x, cos, sin, padding_mask=None, cache: CacheView | None = None, input_ids=None):
        h, post, comb = self.attn_hc.split(x)
        y = self.attn(self.attn_norm(h), cos, sin, None if cache is None else cache.layer(self.layer_id))
        x = self.attn_hc.merge(x, y, post, comb)
        h, post, comb = self.ffn_hc.split(x)
        h = self.ffn_norm(h)
        y = self.ffn(h, padding_mask, input_ids) if self.is_moe else self.ffn(h)
        return self.ffn_hc.merge(x, y, post, comb)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        block = HyperBlock if cfg.hc_streams else Block
        self.blocks = nn.ModuleList(block(cfg, i) for i in range(cfg.n_layers))
        if cfg.hc_streams:  # collapses the hyper-connection streams before the final norm
            self.hc_head = HyperHead(cfg.d_model, cfg.hc_streams, cfg.hc_eps, cfg.norm_eps)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._forward_count = 0  # which forward a ModelOutput's lazy aux_loss belongs to
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
            elif isinstance(module, (CompressedAttention, HyperConnection, HyperHead)):
                module.reset_parameters(std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: CacheView | None = None, logits_at: torch.Tensor | None = None) -> ModelOutput:
        """input_ids [B, S] -> logits [B, S, vocab] (or [B, 1, vocab] with ``logits_at``).

        ``attention_mask`` [B, S] (1 = real token) keeps padding out of routing, balancing
        losses and statistics. Attention is causal, so right padding needs no attention mask.
        ``cache``: the rows' KV-cache slots and positions (their padding is the view's);
        ``logits_at`` [B]: compute only row b's logits at position logits_at[b] (generation
        needs one per sequence, and the output projection is the widest matmul).
        """
        B, S = input_ids.shape
        if cache is None:
            if S > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {S} exceeds max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_tables(input_ids.device)
            cos, sin = cos[:S], sin[:S]
        else:
            cos, sin = (t[cache.positions].unsqueeze(1) for t in self.rope_tables(input_ids.device))  # [B, 1, S, R]
            attention_mask = cache.valid
        self._forward_count += 1
        x = self.embed(input_ids)
        if self.cfg.hc_streams:  # N copies of the embedding: the hyper-connection streams [B, S, N, D]
            x = x.unsqueeze(2).expand(-1, -1, self.cfg.hc_streams, -1).contiguous()
        for block in self.blocks:
            x = block(x, cos, sin, attention_mask, cache, input_ids)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at].unsqueeze(1)  # [B, 1, (N,) D]
        if self.cfg.hc_streams:
            x = self.hc_head(x)
        return ModelOutput(self.lm_head(self.norm(x)), self)

    def rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [max_seq_len, rope_dim] (fp32), built once per device: position p's row
        is the same whatever the sequence length, so training and decode share them."""
        tables = self.__dict__.setdefault("_rope_tables", {})  # plain attribute: not state, not moved by .to()
        if device not in tables:
            c = self.cfg
            tables[device] = rope_cache(c.max_seq_len, c.rope_dim, c.rope_theta, device, c.rope_scaling)
        return tables[device]

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
        see ``moekit.interop.export.save_pretrained`` for the options."""
        from moekit.interop.export import save_pretrained  # export.py does not import this module

        save_pretrained(self, path, **kwargs)


def lm_loss(out: ModelOutput, targets: torch.Tensor, ignore_index: int = -100) -> LossParts:
    """Next-token cross-entropy (targets [B, S], already shifted) plus the MoE balancing losses."""
    lm = F.cross_entropy(
        out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )
    return LossParts(total=lm + out.aux_loss, lm=lm, aux=out.aux_loss)
