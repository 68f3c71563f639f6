"""The offloading flags of ``generate``, ``chat`` and ``serve``, and applying them after loading.

``--expert-cache-gb GB`` or ``--max-memory GB`` turns offloading on (``--offload-experts``
says so explicitly and needs one of them); the two together are refused, and the other
offload flags without either are an error, not silently ignored.
"""

from __future__ import annotations

import argparse

from moekit.argtypes import positive_float
from moekit.errors import UsageError

_DEPENDENT = ("cache_policy", "prefetch", "on_miss", "offload_store", "offload_dir")


def offload_args(s) -> None:
    g = s.add_argument_group("expert offloading (models bigger than memory)")
    g.add_argument("--offload-experts", action="store_true",
                   help="keep the routed experts on disk (or in RAM) behind a per-layer cache; needs --expert-cache-gb "
                        "or --max-memory")
    g.add_argument("--expert-cache-gb", type=positive_float, default=None, metavar="GB",
                   help="memory for cached experts, all MoE layers together (1 GB = 1e9 bytes); turns offloading on. "
                        "Attention, norms, routers, shared experts and the KV cache stay resident besides")
    g.add_argument("--max-memory", type=positive_float, default=None, metavar="GB",
                   help="total memory for the model instead of --expert-cache-gb: non-expert weights + the KV cache "
                        "for the full context (x --max-batch in serve) + the expert cache, which gets the rest; "
                        "turns offloading on")
    g.add_argument("--cache-policy", choices=("lru", "lfu"), default=None,
                   help="which cached expert to evict: lru (least recently used, default) or lfu (least frequently)")
    g.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="guess the next layer's experts with its router and load them in the background (default: on)")
    g.add_argument("--on-miss", choices=("load", "compute"), default=None,
                   help="an expert not in the cache: load it, evicting another (default), or compute it where it is "
                        "stored without caching it (Fiddler)")
    g.add_argument("--offload-store", choices=("disk", "ram"), default=None,
                   help="where the experts live: disk (safetensors files read on demand; default) or ram")
    g.add_argument("--offload-dir", default=None, metavar="OUT",
                   help="folder for the disk store (default: a temporary folder, removed at exit)")


def offload_config(args, kv_sequences: int = 1):
    """The OffloadConfig the flags ask for, or None for no offloading (UsageError on a flag
    that makes no sense alone). ``kv_sequences``: the KV cache slots --max-memory reserves."""
    from moekit.offload.runtime import OffloadConfig

    if args.expert_cache_gb is not None and args.max_memory is not None:
        raise UsageError("--expert-cache-gb and --max-memory both size the expert cache; give one "
                         "(--max-memory derives the cache from a total)")
    if args.expert_cache_gb is None and args.max_memory is None:
        if args.offload_experts:
            raise UsageError("--offload-experts needs --expert-cache-gb GB (the memory for cached experts) "
                             "or --max-memory GB (the total)")
        given = [f"--{n.replace('_', '-')}" for n in _DEPENDENT if getattr(args, n) is not None]
        if given:
            raise UsageError(f"{given[0]} applies to offloaded experts; add --expert-cache-gb GB or --max-memory GB")
        return None
    return OffloadConfig(cache_gb=args.expert_cache_gb, max_memory_gb=args.max_memory, kv_sequences=kv_sequences,
                         policy=args.cache_policy or "lru",
                         prefetch=True if args.prefetch is None else args.prefetch, on_miss=args.on_miss or "load",
                         store=args.offload_store or "disk", store_dir=args.offload_dir)


def apply_offload(model, cfg, quiet: bool = False):
    """Offload an already loaded model's experts per ``cfg`` (None: nothing) -> runtime or None.
    The commands stream instead (``load_for_inference(offload=)``); this is for a model in hand."""
    if cfg is None:
        return None
    from moekit.offload.runtime import offload_model

    rt = offload_model(model, cfg)
    if not quiet:
        report_offload(rt)
    return rt


def report_offload(rt) -> None:
    """One stderr line: where the experts are and how many each layer's cache holds."""
    import sys

    s, cfg = rt.summary(), rt.cfg
    derived = f" (--max-memory {cfg.max_memory_gb:g} leaves {cfg.cache_gb:.3g} GB for the cache)" \
        if cfg.max_memory_gb is not None else ""
    print(f"moekit: experts offloaded to {cfg.store}{derived}: {s['slots_per_layer']} of "
          f"{rt.store.num_experts[next(iter(rt.caches))]} experts cached per MoE layer "
          f"({s['expert_bytes'] / 1e6:.3g} MB each, {s['layers']} layers), policy {cfg.policy}, "
          f"prefetch {'on' if cfg.prefetch else 'off'}, on miss {cfg.on_miss}", file=sys.stderr)


__all__ = ["offload_args", "offload_config", "apply_offload", "report_offload"]
