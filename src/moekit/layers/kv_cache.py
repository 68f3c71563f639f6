"""A preallocated, slot-based key/value cache, and the per-forward view attention reads it through.

Shape legend: L layers, N slots (sequences the cache can hold at once), T_max tokens per slot,
B rows of one forward (each row is one slot), S new tokens per row, T keys attended
(T = max over rows of start + S), Hk cached heads, W cached width per head.

Layout. Every layer keeps a tuple of tensors [N, Hk, T_max, W] in the model's dtype, allocated
once; token t of slot n sits at [n, :, t, :] in each:
    grouped-query attention:  keys [N, Hkv, T_max, hd] and values [N, Hkv, T_max, hd]
    MLA (DeepSeek-V2 sec. 2.1.2): one [N, 1, T_max, Ckv + R] = [kv_norm(c_kv) | rope(k_rope)],
        the compressed latent and the one rope key all heads share, never the per-head k and v
        (``kv_bytes_per_token`` gives the saving; attention absorbs wkv_b into q and the output).
    DeepSeek-V4 (attention="compressed"): per layer, see ``compressed_layer_shapes``.
``lengths[n]`` (host ints) counts the tokens slot n holds. A server admits a sequence by
``reset(n)`` and prefilling it, retires it by simply no longer reading slot n.

A forward that uses the cache gets a ``CacheView``: which slots its B rows are, how many tokens
each already has (``start``, so RoPE positions are start + 0..S-1), and how many of its S new
tokens are real (rows are right-padded). Attention writes its new entries with ``append`` and
attends over what it gets back under ``view.mask``: key t is visible to the query at position p
when t <= p (and p - t < window), so right padding, which only ever sits after a row's real
tokens, is never attended, and stale entries past a slot's length are overwritten before use.
The engine calls ``commit`` after the forward so the lengths count real tokens only.

Sliding-window models keep all T_max positions (a mask, not a ring buffer): simpler, and the
window only bounds what is read, not what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from moekit.config import ModelConfig


def layer_shapes(cfg: ModelConfig, layer: int = 0) -> list[tuple[int, int]]:
    """(cached heads, width) of each tensor layer ``layer`` caches."""
    if cfg.attention == "mla":
        return [(1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)]
    if cfg.attention == "compressed":
        return compressed_layer_shapes(cfg, layer)
    return [(cfg.kv_heads, cfg.resolved_head_dim)] * 2


def compressed_layer_shapes(cfg: ModelConfig, layer: int) -> list[tuple[int, int]]:
    """DeepSeek-V4 (kv_compression.py): the one key=value head, and in compressed layers each
    token's compressor projections (kv and gate; csa: both halves, and the indexer's too)."""
    c, C = cfg.compression, cfg.resolved_head_dim
    kind = c.layers[layer]
    if kind == "none":
        return [(1, C)]
    if kind == "hca":
        return [(1, C)] * 3
    return [(1, C), (1, 2 * C), (1, 2 * C), (1, 2 * c.index_head_dim), (1, 2 * c.index_head_dim)]


def kv_values_per_token(cfg: ModelConfig) -> int:
    """Cached values per token over all layers."""
    return sum(h * w for i in range(cfg.n_layers) for h, w in layer_shapes(cfg, i))


def uncompressed_kv_values_per_token(cfg: ModelConfig) -> int:
    """What caching full per-head keys and values would take (MLA's k is N + R wide, v is V)."""
    if cfg.attention != "mla":
        return kv_values_per_token(cfg)
    return cfg.n_layers * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)


class KVCache:
    """Keys and values of up to ``num_slots`` sequences of up to ``max_len`` tokens, every layer."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        max_len = cfg.max_seq_len if max_len is None else max_len
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={cfg.max_seq_len}], got {max_len}")
        self.cfg, self.num_slots, self.max_len = cfg, num_slots, max_len
        self.window = cfg.sliding_window
        self.layers: list[tuple[torch.Tensor, ...]] = [
            tuple(torch.zeros(num_slots, h, max_len, w, dtype=dtype, device=device) for h, w in layer_shapes(cfg, i))
            for i in range(cfg.n_layers)
        ]
        self.lengths = [0] * num_slots

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    def reset(self, slot: int) -> None:
        """Empty ``slot`` for a new sequence (its old entries are overwritten before they are read)."""
        self.lengths[slot] = 0

    def view(self, slots: Sequence[int], new_tokens: Sequence[int], seq_len: int) -> CacheView:
        """The view for one forward of ``seq_len`` new positions per row, row b being slot
        ``slots[b]`` with ``new_tokens[b]`` real tokens (the rest right padding)."""
        if len(slots) != len(new_tokens) or not slots:
            raise ValueError("slots and new_tokens must be non-empty and of equal length")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one forward: {list(slots)}")
        start = [self.lengths[s] for s in slots]
        for s, st, n in zip(slots, start, new_tokens):
            if not 1 <= n <= seq_len:
                raise ValueError(f"slot {s}: {n} new tokens for a forward of {seq_len}")
            if st + seq_len > self.max_len:
                raise ValueError(f"slot {s}: {st} cached + {seq_len} new tokens exceed the cache's {self.max_len}")
        return CacheView(self, list(slots), start, list(new_tokens), seq_len)

    def commit(self, view: CacheView) -> None:
        """Count the view's real new tokens as cached (call once after its forward)."""
        for s, n in zip(view.slots, view.new_tokens):
            self.lengths[s] += n


@dataclass
class CacheView:
    """One forward's window on the cache: B rows (slots), each with ``start`` cached tokens and
    ``new_tokens`` real ones among the S new positions. Built by ``KVCache.view``."""

    cache: KVCache
    slots: list[int]
    start: list[int]
    new_tokens: list[int]
    seq_len: int
    _derived: dict = field(default_factory=dict, repr=False)

    @property
    def fresh(self) -> bool:
        """Every row starts empty: attention over the new keys alone, plain causal, as in training."""
        return not any(self.start)

    @property
    def num_keys(self) -> int:
        return max(self.start) + self.seq_len

    def _memo(self, name: str, make):
        if name not in self._derived:
            self._derived[name] = make()
        return self._derived[name]

    @property
    def positions(self) -> torch.Tensor:
        """[B, S] int64 RoPE positions of the new tokens."""
        def make():
            start = torch.tensor(self.start, device=self.cache.device)
            return start[:, None] + torch.arange(self.seq_len, device=self.cache.device)
        return self._memo("positions", make)

    @property
    def valid(self) -> torch.Tensor | None:
        """[B, S] bool, True at real tokens; None when no row is padded."""
        if all(n == self.seq_len for n in self.new_tokens):
            return None
        return self._memo("valid", lambda: torch.arange(self.seq_len, device=self.cache.device)[None, :]
                          < torch.tensor(self.new_tokens, device=self.cache.device)[:, None])

    @property
    def mask(self) -> torch.Tensor | None:
        """``mask_for`` the model's sliding window (what every layer uses unless told otherwise)."""
        return self.mask_for(self.cache.window)

    def mask_for(self, window: int | None, chunk: int | None = None) -> torch.Tensor | None:
        """[B, 1, S, T] bool, True where a new token may attend a cached key (causal, and within
        ``window`` keys back or the same ``chunk`` when given: a layer's own, as GPT-OSS's and
        Llama 4's differ by layer);
        None when every row may attend all T keys (one new token per row, all rows at the same
        position, inside the window: the common batch-1 decode step needs no mask)."""
        def make():
            from moekit.layers.attention import local_mask  # attention.py imports this module

            keys = torch.arange(self.num_keys, device=self.cache.device)  # [T]
            return local_mask(self.positions[:, None, :, None], keys, window, chunk)  # [B, 1, S, T]
        limit = min(window or self.num_keys, chunk or self.num_keys)
        if self.seq_len == 1 and len(set(self.start)) == 1 and self.num_keys <= limit:
            return None
        return self._memo(("mask", window, chunk), make)

    def _rows(self):
        """Index of the B rows' slots: a slice when they are consecutive (a view, no copy)."""
        def make():
            first = self.slots[0]
            if self.slots == list(range(first, first + len(self.slots))):
                return slice(first, first + len(self.slots))
            return torch.tensor(self.slots, device=self.cache.device)
        return self._memo("rows", make)

    def append(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this forward's entries of ``layer`` (each [B, Hk, S, W], in the cache's layout)
        and return what attention reads: the new entries themselves when ``fresh``, else each
        cached tensor's rows [B, Hk, T, W] (T = ``num_keys``), to be attended under ``mask``."""
        stored = self.cache.layers[layer]
        pos = self.positions  # [B, S]
        rows = self._rows()
        slot_idx = self._memo("slot_idx", lambda: torch.tensor(self.slots, device=pos.device)[:, None])  # [B, 1]
        same_start = isinstance(rows, slice) and len(set(self.start)) == 1
        for buf, x in zip(stored, new):
            if same_start:  # consecutive slots at one position (batch-1 decode): a plain slice copy
                buf[rows, :, self.start[0]: self.start[0] + self.seq_len] = x
            else:
                buf[slot_idx, :, pos] = x.transpose(1, 2).to(buf.dtype)  # indexes as [B, S, Hk, W]
        if self.fresh:
            return new
        return tuple(buf[rows, :, : self.num_keys] for buf in stored)

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)


@dataclass(frozen=True)
class LayerCache:
    """What an attention layer holds: the view and its own layer index."""

    view: CacheView
    index: int

    def append(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.view.append(self.index, *new)


__all__ = ["KVCache", "CacheView", "LayerCache", "layer_shapes", "kv_values_per_token",
           "uncompressed_kv_values_per_token"]
