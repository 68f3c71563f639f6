"""``moekit serve MODEL``: load a run folder or Hugging Face folder and serve it over HTTP.

FastAPI and uvicorn are imported only here, inside ``cmd_serve``, so a moekit without the
``serve`` extra runs every other command and says what to install for this one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moekit.argtypes import IntArg, positive_int
from moekit.errors import UsageError
from moekit.inference.cli import loading_args
from moekit.offload.cli import offload_args, offload_config, report_offload
from moekit.quant.cli import add_load_args, quant_config


# Prompt tokens prefilled per step over all newcomers: the running streams wait at most one
# chunk's forward per token, while each expert of a top-2-of-8 layer still gets ~32 rows of a
# chunk. Chosen by a sweep at 16 clients (benchmarks/serve_load.py --prefill-chunk N,
# docs/benchmarks.md): 128 halves the p99 inter-token latency of 256 at the same or better
# throughput; 64 and 32 cut the p99 further but lost a quarter of the throughput and doubled
# TTFT there (every step that prefills also runs the decode rows as a forward of their own);
# one engine-only run on 1 thread favoured 64, so it is worth a quiet re-run.
SERVE_PREFILL_CHUNK = 128


def _require_server_stack() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"moekit serve needs FastAPI and uvicorn ({e.name} is missing): "
                         "pip install 'moekit[serve]'") from None


def build_state(model, tokenizer, defaults, name: str, max_batch: int, max_waiting: int,
                max_tokens_per_step: int | None = None, api_key: str | None = None, fast_decode: bool = False):
    """The server's shared state for a loaded (model, tokenizer, generation defaults)."""
    from moekit.inference.engine import Engine
    from moekit.serve.app import ServeState
    from moekit.serve.scheduler import Scheduler

    token_choice = all(layer.cfg.router != "expert_choice" for layer in model.moe_layers())
    engine = Engine(model, tokenizer, max_batch=max_batch, record_routing=token_choice,  # routing: usage.moe, the page
                    prefill_chunk=max_tokens_per_step, fast_decode=fast_decode)
    scheduler = Scheduler(engine, max_waiting)
    sampling = {}
    if defaults.source is not None:  # the folder's generation_config.json, for fields a request leaves out
        sampling["repetition_penalty"] = defaults.repetition_penalty
        if defaults.do_sample:
            sampling.update(temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k,
                            min_p=defaults.min_p)

    def chat_prompt(messages: list[dict]) -> list[int]:
        try:
            return tokenizer.encode_chat(messages)
        except UsageError as e:  # the template's raise_exception: the conversation is the problem
            raise ValueError(str(e)) from None

    return ServeState(
        scheduler, tokenizer, name, model.cfg.vocab_size,
        stop_ids=frozenset(defaults.eos_ids) | frozenset(tokenizer.eos_ids),
        chat_prompt=chat_prompt if tokenizer.has_chat_template else None,
        api_key=api_key, defaults=sampling)


def cmd_serve(args) -> int:
    _require_server_stack()
    import torch

    from moekit.inference.loading import load_for_inference
    from moekit.serve.server import run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    offload = offload_config(args, kv_sequences=args.max_batch)  # --max-memory reserves each slot's KV cache
    qcfg = quant_config(args)
    if qcfg is not None:
        qcfg.check_supported()  # before minutes of loading
    if offload is not None:  # experts streamed to the store layer by layer, quantized as they go
        model, tokenizer, defaults = load_for_inference(
            args.model, args.dtype, args.device, check_memory=not args.force, check_finite=not args.no_check_finite,
            quantize=qcfg, reference=args.reference, offload=offload)
        report_offload(model.offload)
    else:
        model, tokenizer, defaults = load_for_inference(args.model, args.dtype, args.device,
                                                        check_memory=not args.force,
                                                        check_finite=not args.no_check_finite,
                                                        reference=args.reference)
        if qcfg is not None:  # quantize at load (a folder written by `moekit quantize` loads quantized as it is)
            from moekit.quant.convert import quantize_at_load

            cov = quantize_at_load(model, qcfg)
            if cov is not None:
                print(cov.format(), file=sys.stderr)
    name = args.served_model_name or Path(args.model).resolve().name
    state = build_state(model, tokenizer, defaults, name, args.max_batch, args.max_waiting,
                        args.max_tokens_per_step, args.api_key, args.fast_decode)
    print(f"moekit serve: {name}, up to {args.max_batch} sequences per step; the routing viewer is at /", flush=True)
    run(state, args.host, args.port, args.log_level)
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (needs moekit[serve])")
    s.add_argument("model", metavar="MODEL_DIR", help="a moekit run folder or a Hugging Face model folder")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it to the network)")
    s.add_argument("--port", type=IntArg(0, 65535), default=8000, help="TCP port (default: 8000; 0 = any free port)")
    s.add_argument("--max-batch", type=positive_int, default=16,
                   help="sequences decoded together at most, each with its own KV slot (default: 16; 1 = no batching)")
    s.add_argument("--max-waiting", type=positive_int, default=64,
                   help="requests queued behind the running ones; beyond that a request gets 429 (default: 64)")
    s.add_argument("--max-tokens-per-step", type=positive_int, default=SERVE_PREFILL_CHUNK,
                   help="prompt tokens prefilled per engine step over all newcomers; longer prompts go in "
                        "chunks over several steps while running requests keep decoding in between "
                        f"(chunked prefill; default: {SERVE_PREFILL_CHUNK})")
    s.add_argument("--fast-decode", action="store_true",
                   help="decode steps take a matrix-vector kernel built by AOTInductor for their one-row "
                        "matmuls (CPU, fp32 or bf16; needs a C++ compiler; the first start on a machine builds "
                        "it for ~10-25 s, later starts load it). It speeds batch-1 decode most; a busy "
                        "server's steps carry many rows (default: off)")
    s.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the checkpoint's)")
    s.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    add_load_args(s)  # --quantize, --group-size, --quantize-scope, --reference
    s.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    loading_args(s)
    offload_args(s)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* requests (default: no key)")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the folder's name)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default: info; debug also logs every request)")
    s.set_defaults(func=cmd_serve)


__all__ = ["add_parser", "cmd_serve", "build_state"]
