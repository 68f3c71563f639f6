"""Routing traces: which experts every token used in every MoE layer, and what a prefetcher
would have guessed for it. The offload planner (``planner.py``) replays them offline.

Shape legend: T tokens (in stream order, the order a decode meets them), L MoE layers,
K experts per token, S window length, D model dim.

1. ``token_stream``: text sources -> one stream of token ids, each document followed by
   end-of-text, at most ``max_tokens`` long.
2. ``record_trace``: forward the stream in windows of S tokens. Hooks record, per MoE layer,
   the router's top-k ids [T, K] and the prefetch guess for that layer: its router applied to
   the previous MoE block's output hidden state, through this block's FFN norm (the norm every
   router input passes). That is mixtral-offloading's speculative guess (Eliseev & Mazur 2023,
   sec. 3.2): known one layer early, so the load can overlap the previous layer's compute.
   The first MoE layer has no guess (-1).
3. ``Trace.save`` / ``load_trace``: one safetensors file, ``experts`` and ``guess`` int16
   [L, T, K], ``tokens`` int32 [T], and a JSON header (``TraceHeader``) in its metadata that
   names the model: family, MoE layers, experts, top-k, its config and a fingerprint of it.

A windowed forward routes each token as a cached decode does (attention is causal); only the
context is cut at window borders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moekit.errors import ModelFolderError, UsageError

FORMAT = "moekit-routing-trace"
VERSION = 1
NO_GUESS = -1  # ``guess`` of the first MoE layer: nothing runs before it to guess from


class TraceError(ModelFolderError):
    """A trace file that cannot be read, or that belongs to another model (names the mismatch)."""


def config_fingerprint(cfg_dict: dict) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of a model's config: the same
    architecture (whatever its dtype, quantization or folder) gives the same fingerprint."""
    text = json.dumps(cfg_dict, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class TraceHeader:
    """What a trace was recorded on; JSON in the file's metadata."""

    family: str  # Hugging Face model_type, or "moekit" for a model trained here
    moe_layers: list[int]  # block index of every MoE layer, in depth order
    num_experts: int  # routed experts per MoE layer
    top_k: int  # experts per token
    fingerprint: str  # config_fingerprint(config)
    config: dict  # the model's ModelConfig as a dict: a mismatch names the differing field
    expert_bytes: int  # bytes of one expert's weights as traced (dtype or quantization included)
    expert_dtype: str  # "torch.bfloat16", "int8", ...
    model: str  # MODEL as given
    source: str  # the text that was traced
    num_tokens: int = 0
    decode_tokens_per_s: float | None = None  # measured in memory at trace time (None: not measured)
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "TraceHeader":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise TraceError(f"{where} is not a moekit routing trace (format {data.get('format')!r})")
            if data.get("version") != VERSION:
                raise TraceError(f"{where} is trace format version {data.get('version')}; this moekit reads {VERSION}")
            return cls(**data)
        except (ValueError, TypeError, AttributeError) as e:
            if isinstance(e, TraceError):
                raise
            raise TraceError(f"{where}: unreadable trace header ({e})") from None


@dataclass
class Trace:
    header: TraceHeader
    experts: np.ndarray  # [L, T, K] int16: expert ids each token used, by rank
    guess: np.ndarray  # [L, T, K] int16: the prefetch guess (NO_GUESS for the first MoE layer)
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [T] int32 token ids

    @property
    def num_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[1]

    def save(self, path: str | Path) -> Path:
        """Write atomically (a reader never sees half a trace)."""
        from safetensors.numpy import save

        from moekit.fileio import atomic_write_bytes

        tensors = {"experts": np.ascontiguousarray(self.experts, np.int16),
                   "guess": np.ascontiguousarray(self.guess, np.int16),
                   "tokens": np.ascontiguousarray(self.tokens, np.int32)}
        atomic_write_bytes(path, save(tensors, metadata={"moekit_trace": self.header.to_json()}))
        return Path(path)


def load_trace(path: str | Path) -> Trace:
    """Read a trace file; TraceError (one line) for a missing, truncated or foreign file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise TraceError(f"no such trace file: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if "moekit_trace" not in meta:
                raise TraceError(f"{path} is a safetensors file but not a moekit routing trace")
            header = TraceHeader.from_json(meta["moekit_trace"], str(path))
            arrays = {k: f.get_tensor(k) for k in ("experts", "guess", "tokens")}
    except (SafetensorError, OSError, KeyError) as e:
        raise TraceError(f"{path} is truncated or not a routing trace ({' '.join(str(e).split())})") from None
    trace = Trace(header, arrays["experts"], arrays["guess"], arrays["tokens"])
    _check_shapes(trace, path)
    return trace


def _check_shapes(trace: Trace, path: Path) -> None:
    h, e = trace.header, trace.experts
    want = (len(h.moe_layers), h.num_tokens, h.top_k)
    for name, a in (("experts", e), ("guess", trace.guess)):
        if a.shape != want:
            raise TraceError(f"{path}: tensor {name!r} is {list(a.shape)}; the header implies {list(want)}")
    if e.size and (e.min() < 0 or e.max() >= h.num_experts):
        raise TraceError(f"{path}: tensor 'experts' holds ids outside [0, {h.num_experts})")


# --- checking a trace against a model ------------------------------------------------------


def model_config_of(model: str):
    """MODEL (a run folder, a HF or quantized folder, a config JSON or a preset) -> its
    ModelConfig, read from config files only (no weights)."""
    from moekit.resolve import resolve_config
    from moekit.training.run import is_run_dir, read_run_configs

    if Path(model).is_dir() and is_run_dir(model):
        return read_run_configs(model)[1]
    return resolve_config(model)[1]


def check_trace_matches(header: TraceHeader, cfg, model_label: str, trace_label: str = "the trace") -> None:
    """TraceError naming the first difference when ``header`` was recorded on another model
    than ``cfg`` (a ModelConfig): MoE layers, experts, top-k, then any config field."""
    if cfg.moe is None:
        raise TraceError(f"{model_label} is a dense model; {trace_label} was recorded on an MoE model")
    checks = [("MoE layers", header.moe_layers, list(cfg.moe_layer_ids)),
              ("experts per layer", header.num_experts, cfg.moe.num_experts),
              ("top-k", header.top_k, cfg.moe.top_k)]
    for what, theirs, ours in checks:
        if theirs != ours:
            raise TraceError(f"{trace_label} is from another model: {what} {theirs} in the trace, "
                             f"{ours} in {model_label}")
    ours = cfg.to_dict()
    if config_fingerprint(ours) != header.fingerprint:
        field_name, a, b = _first_difference(header.config, ours)
        raise TraceError(f"{trace_label} is from another model: {field_name} {a!r} in the trace, {b!r} in {model_label}")


def _first_difference(a: dict, b: dict, prefix: str = "") -> tuple[str, object, object]:
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            if config_fingerprint(x) != config_fingerprint(y):
                return _first_difference(x, y, f"{prefix}{key}.")
        elif x != y:
            return f"{prefix}{key}", x, y
    return "config fingerprint", None, None


# --- recording ------------------------------------------------------------------------------


def token_stream(sources: list[str], tokenizer, max_tokens: int) -> np.ndarray:
    """Documents of ``sources`` (files or folders, as training reads them) -> [T] int64 ids,
    each document followed by end-of-text, cut at ``max_tokens``."""
    from moekit.data.sources import Corpus

    eos = tokenizer.eos_ids[:1]
    parts, n = [], 0
    for doc in Corpus(sources).documents():
        ids = tokenizer.encode(doc.text) + eos
        parts.append(np.asarray(ids, np.int64))
        n += len(ids)
        if n >= max_tokens:
            break
    if not parts or n == 0:
        raise UsageError(f"no text to trace in {', '.join(sources)}")
    return np.concatenate(parts)[:max_tokens]


def expert_bytes(model) -> tuple[int, str]:
    """(bytes of one expert's weights, their dtype) of the first MoE layer, as loaded:
    a quantized model's int codes plus scales."""
    experts = model.moe_layers()[0].experts
    tensors = list(experts.state_dict().values())
    total = sum(t.numel() * t.element_size() for t in tensors)
    kinds = sorted({str(t.dtype) for t in tensors})
    quant = getattr(model, "quantization", None)
    return total // experts.num_experts, (f"int{quant.bits}" if quant is not None else "/".join(kinds))


def guess_experts(next_block, h_BSD: torch.Tensor) -> torch.Tensor:
    """The prefetch guess [B*S, K]: ``next_block``'s router applied to the hidden state that
    enters it, before its attention has run (mixtral-offloading). Through the block's FFN norm,
    since every router input passes it; with the router's own selection rule (bias, groups)."""
    return next_block.ffn.router(next_block.ffn_norm(h_BSD).flatten(0, 1)).ids


class _Recorder:
    """Forward hooks: every router's top-k ids, and after every MoE block but the last, the
    next MoE layer's router applied to that block's output (the prefetch guess)."""

    def __init__(self, model):
        blocks = [b for b in model.blocks if b.is_moe]
        self.ids: list[list[torch.Tensor]] = [[] for _ in blocks]
        self.guesses: list[list[torch.Tensor]] = [[] for _ in blocks]
        self._guessing = False  # the guess calls a router: its own hook must not record that call
        self.handles = [b.ffn.router.register_forward_hook(self._ids_hook(i)) for i, b in enumerate(blocks)]
        self.handles += [b.register_forward_hook(self._guess_hook(i + 1, nxt))
                         for i, (b, nxt) in enumerate(zip(blocks, blocks[1:]))]

    def _ids_hook(self, i: int):
        def hook(module, args, out):
            if not self._guessing:
                if out.expert_choice:  # ids are [E, C] token ids: no per-token top-k to record
                    raise UsageError("trace needs token-choice routing; this model's routers use expert choice")
                self.ids[i].append(out.ids.to("cpu", torch.int16))
        return hook

    def _guess_hook(self, target: int, nxt):
        def hook(module, args, out_BSD):
            self._guessing = True
            try:
                self.guesses[target].append(guess_experts(nxt, out_BSD).to("cpu", torch.int16))
            finally:
                self._guessing = False
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def record_routing(model, ids_T: np.ndarray, window: int, batch_size: int = 4,
                   progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Forward ``ids_T`` in windows of ``window`` tokens -> (experts, guess), both [L, T, K] int16."""
    model.eval()
    device = next(model.parameters()).device
    T = len(ids_T)
    starts = list(range(0, T, window))
    rec = _Recorder(model)
    try:
        done = 0
        full = [s for s in starts if s + window <= T]
        for b in range(0, len(full), batch_size):  # full windows batched, in stream order
            rows = full[b: b + batch_size]
            model(torch.from_numpy(np.stack([ids_T[s: s + window] for s in rows])).to(device))
            done += len(rows) * window
            if progress:
                progress(done, T)
        if len(full) < len(starts):  # the shorter last window alone
            model(torch.from_numpy(ids_T[starts[-1]:][None]).to(device))
            if progress:
                progress(T, T)
    finally:
        rec.remove()
    K = model.cfg.moe.top_k
    experts = np.stack([torch.cat(p).numpy() for p in rec.ids])  # [L, T, K]
    guess = np.full_like(experts, NO_GUESS)
    for i, parts in enumerate(rec.guesses):
        if parts:
            guess[i] = torch.cat(parts).numpy()
    assert experts.shape == (len(rec.ids), T, K), experts.shape
    return experts, guess


def measure_decode(model, ids_T: np.ndarray, new_tokens: int) -> float | None:
    """In-memory greedy decode tokens/s at batch 1 over ``new_tokens`` tokens (None for 0):
    the compute time per token that the planner adds the transfers to."""
    if new_tokens <= 0:
        return None
    from moekit.inference.engine import Engine
    from moekit.inference.sampling import SamplingParams

    prompt = [int(t) for t in ids_T[: min(16, len(ids_T))]]
    engine = Engine(model, None, max_batch=1, max_len=min(model.cfg.max_seq_len, len(prompt) + new_tokens))
    params = SamplingParams(max_new_tokens=min(new_tokens, engine.max_len - len(prompt)), temperature=0.0)
    engine.generate([prompt], params)
    return engine.stats.to_dict()["decode_tokens_per_s"]


def record_trace(model, tokenizer, sources: list[str], model_label: str, max_tokens: int = 4096,
                 window: int | None = None, decode_tokens: int = 16,
                 progress: Callable[[int, int], None] | None = None) -> Trace:
    """Trace ``model`` over the text of ``sources`` (see the module docstring)."""
    if model.cfg.moe is None:
        raise UsageError(f"{model_label} is a dense model: it has no routing to trace")
    ids_T = token_stream(sources, tokenizer, max_tokens)
    return trace_tokens(model, ids_T, model_label, ", ".join(sources), window, decode_tokens, progress)


def trace_tokens(model, ids_T, model_label: str, source: str = "token ids", window: int | None = None,
                 decode_tokens: int = 0, progress: Callable[[int, int], None] | None = None) -> Trace:
    """Trace ``model`` over given token ids [T] (e.g. a real run's prompt and output, for
    comparing its cache counters with the planner's replay of the same tokens)."""
    if model.cfg.moe is None:
        raise UsageError(f"{model_label} is a dense model: it has no routing to trace")
    ids_T = np.asarray(ids_T, dtype=np.int64)
    if ids_T.ndim != 1 or len(ids_T) == 0:
        raise UsageError(f"trace_tokens needs a non-empty 1-D sequence of token ids; got shape {list(ids_T.shape)}")
    cfg = model.cfg
    window = min(window or cfg.max_seq_len, cfg.max_seq_len)
    experts, guess = record_routing(model, ids_T, window, progress=progress)
    nbytes, dtype = expert_bytes(model)
    hf = getattr(model, "hf_config", None) or {}
    header = TraceHeader(
        family=hf.get("model_type", "moekit"), moe_layers=list(cfg.moe_layer_ids), num_experts=cfg.moe.num_experts,
        top_k=cfg.moe.top_k, fingerprint=config_fingerprint(cfg.to_dict()), config=cfg.to_dict(),
        expert_bytes=nbytes, expert_dtype=dtype, model=model_label, source=source,
        num_tokens=len(ids_T), decode_tokens_per_s=measure_decode(model, ids_T, decode_tokens))
    return Trace(header, experts, guess, ids_T.astype(np.int32))


__all__ = ["Trace", "TraceHeader", "TraceError", "load_trace", "record_trace", "trace_tokens", "record_routing", "token_stream",
           "check_trace_matches", "guess_experts", "model_config_of", "config_fingerprint", "expert_bytes", "NO_GUESS"]
