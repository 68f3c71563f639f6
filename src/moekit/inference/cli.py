"""``moekit generate`` and ``moekit chat``: parsers and their plain functions.

Sampling flags left unset take the model folder's generation_config.json values (transformers'
rule: greedy unless it says ``do_sample``); a flag given wins.
"""

from __future__ import annotations

import json
import sys
import time

from moekit.argtypes import FloatArg, nonneg_float, nonneg_int, positive_float, positive_int
from moekit.errors import UsageError
from moekit.offload.cli import offload_args, offload_config, report_offload
from moekit.quant.cli import add_load_args, quant_config


# Prompt tokens `moekit generate`, `chat` and the benchmark prefill per forward. Chunks bound
# the activations of long prompts, but on the 389M bench model (990-token prompt, peak over
# weights + KV) chunks of 256 cut fp32's 123 MB to 51 MB while bf16 went from 122 MB to 167 MB
# (the allocator keeps each chunk's differently sized buffers), so only prompts beyond 1024
# tokens are split. `serve` uses smaller chunks for latency (serve/cli.py).
DEFAULT_PREFILL_CHUNK = 1024


def _sampling_args(s, default_max: str) -> None:
    s.add_argument("model", metavar="MODEL", help="a moekit run folder or a Hugging Face model folder")
    s.add_argument("--max-new-tokens", type=positive_int, default=None, help=f"tokens to generate at most (default: {default_max})")
    s.add_argument("--temperature", type=nonneg_float, default=None,
                   help="softmax temperature, 0 = greedy (default: the folder's generation_config, else greedy)")
    s.add_argument("--top-k", type=nonneg_int, default=None, help="sample among the k likeliest tokens; 0 = off (default: the folder's)")
    s.add_argument("--top-p", type=FloatArg(0.0, strict=True, maximum=1.0), default=None, help="nucleus sampling mass in (0, 1] (default: the folder's, else 1)")
    s.add_argument("--min-p", type=FloatArg(0.0, maximum=1.0), default=None, help="drop tokens below min_p x the top probability (default: 0)")
    s.add_argument("--repetition-penalty", type=positive_float, default=None, help="> 1 discourages repeats (default: 1)")
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT; the text is cut right before it (repeatable)")
    s.add_argument("--seed", type=nonneg_int, default=0, help="sampling seed; the same seed gives the same text (default: 0)")
    s.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the checkpoint's)")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    s.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's, one per core); on a busy machine use fewer, often 1")
    s.add_argument("--fast-decode", action="store_true",
                   help="decode steps use a matrix-vector kernel built by AOTInductor (CPU, fp32 or bf16; needs "
                        "a C++ compiler; the first run on a machine builds it for ~10-25 s, later runs load "
                        "it): ~1.2-1.5x decode tokens/s at batch 1 on the bench model in fp32, ~2x in bf16; "
                        "prefill is unchanged (default: off)")
    loading_args(s)
    add_load_args(s)
    offload_args(s)


def loading_args(s) -> None:
    """The loader's safety checks, each skippable (shared with ``moekit serve``)."""
    s.add_argument("--force", action="store_true", help="skip the check that the model fits in the memory available")
    s.add_argument("--no-check-finite", action="store_true", help="skip the NaN/inf check of the checkpoint's tensors")


def _prefill_arg(s) -> None:
    s.add_argument("--prefill-chunk", type=nonneg_int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help="prefill long prompts N tokens per forward: bounds the activation memory "
                        f"(default: {DEFAULT_PREFILL_CHUNK}; 0 = the whole prompt in one forward)")


def add_parser(sub) -> None:
    """Register generate and chat on the ``moekit`` subparsers."""
    s = sub.add_parser("generate", help="continue a prompt with a run folder's or Hugging Face folder's model (KV cache)")
    _sampling_args(s, "the folder's, else 256")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt from PATH ('-' = standard input)")
    s.add_argument("--truncate", choices=("error", "left"), default="error",
                   help="a prompt longer than the context: error (default) or keep its last tokens (left)")
    s.add_argument("--json", action="store_true",
                   help="print one JSON record (token ids, text, timings, tokens/s) instead of streaming text")
    s.add_argument("--show-routing", action="store_true",
                   help="after the text, which experts each generated token used in each MoE layer (in --json: 'routing')")
    _prefill_arg(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="talk to an instruct model: chat template, history, /reset and /exit")
    _sampling_args(s, "the folder's, else 512")
    _prefill_arg(s)
    s.add_argument("--system", default=None, help="a system message at the start of the conversation")
    s.set_defaults(func=cmd_chat)


# -- shared -------------------------------------------------------------------------------------

def _load(args):
    import torch

    from moekit.inference.loading import load_for_inference

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _sampling_params(args, None, [])  # bad flag values fail before minutes of loading
    qcfg = quant_config(args)  # likewise a bad scope or group size
    if qcfg is not None:
        qcfg.check_supported()
    offload = offload_config(args)  # and bad offload flags
    model, tok, defaults = load_for_inference(args.model, dtype=args.dtype, device=args.device,
                                              check_memory=not args.force, check_finite=not args.no_check_finite,
                                              quantize=qcfg, reference=args.reference, offload=offload)
    if offload is not None:  # streamed to the store layer by layer (int8/int4 when quantizing at load)
        report_offload(model.offload)
    return model, tok, defaults


def _sampling_params(args, defaults, eos_ids: list[int], default_max: int = 256):
    """Flags over the folder's generation defaults -> SamplingParams (ValueError names a bad field)."""
    from moekit.inference.sampling import SamplingParams

    pick = lambda flag, default_value: flag if flag is not None else default_value  # noqa: E731
    if defaults is None:  # validation only
        greedy, d_temp, d_k, d_p, d_min, d_rep, d_max = True, 1.0, 0, 1.0, 0.0, 1.0, default_max
    else:
        greedy, d_temp, d_k, d_p = not defaults.do_sample, defaults.temperature, defaults.top_k, defaults.top_p
        d_min, d_rep, d_max = defaults.min_p, defaults.repetition_penalty, defaults.max_new_tokens or default_max
    top_k = pick(args.top_k, d_k)
    if top_k is not None and top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    return SamplingParams(
        max_new_tokens=pick(args.max_new_tokens, d_max), temperature=pick(args.temperature, 0.0 if greedy else d_temp),
        top_k=top_k or None, top_p=pick(args.top_p, d_p), min_p=pick(args.min_p, d_min),
        repetition_penalty=pick(args.repetition_penalty, d_rep), stop_token_ids=tuple(eos_ids),
        stop=tuple(args.stop), seed=args.seed)


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None


def fit_prompt(ids: list[int], context: int, max_new_tokens: int, truncate: str) -> list[int]:
    """The prompt ids that go in: all of them, or (``truncate='left'``) the last ones leaving
    room for ``max_new_tokens``; a prompt that does not fit otherwise is a UsageError."""
    if not ids:
        raise UsageError("the prompt is empty and the tokenizer adds no BOS token; give some text")
    if len(ids) < context:
        return ids
    if truncate == "left":
        return ids[-max(1, context - max_new_tokens):]
    raise UsageError(f"the prompt has {len(ids)} tokens but the model's context is {context}; "
                     "shorten it or pass --truncate left")


# -- generate -----------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    from moekit.inference.engine import Engine

    text = _read_prompt(args)
    model, tok, defaults = _load(args)
    params = _sampling_params(args, defaults, defaults.eos_ids or tok.eos_ids)
    context = model.cfg.max_seq_len
    ids = fit_prompt(tok.encode(text), context, params.max_new_tokens, args.truncate)
    engine = Engine(model, tok, max_batch=1, max_len=min(context, len(ids) + params.max_new_tokens),
                    record_routing=args.show_routing, prefill_chunk=args.prefill_chunk or None,
                    fast_decode=args.fast_decode)
    t0 = time.perf_counter()
    seq = engine.add(ids, params)
    first = prefill_stats = None
    rt = getattr(model, "offload", None)
    while not seq.finished:
        engine.step()
        first = first or time.perf_counter()
        if args.json and rt is not None and prefill_stats is None and seq.output_ids:
            rt.drain()  # the prefill's prefetch loads count as the prefill's
            prefill_stats = rt.stats
        if not args.json and (piece := seq.take_text()):
            print(piece, end="", flush=True)
    if not args.json:
        print(seq.take_text(), flush=True)
    total = time.perf_counter() - t0
    if args.json:
        rec = _record(seq, tok, engine, total, first - t0, args.show_routing, model)
        if prefill_stats is not None:  # the decode steps' own counters: bytes per decode token
            rec["offload"]["decode"] = rt.stats.since(prefill_stats).to_dict(tokens=engine.stats.decode_tokens)
        print(json.dumps(rec, ensure_ascii=False))
    elif args.show_routing:
        print(format_routing(seq, tok, model))
    return 0


def _record(seq, tok, engine, total: float, ttft: float, routing: bool, model=None) -> dict:
    st = engine.stats
    rec = dict(prompt_ids=seq.prompt_ids, output_ids=seq.output_ids, text=seq.text, finish_reason=seq.finish_reason,
               prompt_tokens=len(seq.prompt_ids), generated_tokens=len(seq.output_ids),
               seconds=dict(total=total, time_to_first_token=ttft, prefill=st.prefill_seconds, decode=st.decode_seconds),
               prefill_tokens_per_s=st.to_dict()["prefill_tokens_per_s"],
               decode_tokens_per_s=st.to_dict()["decode_tokens_per_s"])
    if (rt := getattr(model, "offload", None)) is not None:  # cache counters; bytes per token over all tokens run
        rt.drain()
        rec["offload"] = rt.summary(tokens=len(seq.prompt_ids) + len(seq.output_ids))
    if routing:
        rec["routing"] = [dict(token_id=t, token=tok.token_text(t), experts=r)
                          for t, r in zip(seq.output_ids, seq.routing)]
    return rec


def format_routing(seq, tok, model) -> str:
    """One line per generated token: its vocabulary entry, then the experts of each MoE layer."""
    layers = model.cfg.moe_layer_ids
    if not layers:
        return "(a dense model: no routing to show)"
    head = f"{'token':<16} " + "  ".join(f"L{i}" for i in layers)
    lines = ["", "experts per generated token (of the forward position that predicted it)", head]
    for t, r in zip(seq.output_ids, seq.routing):
        lines.append(f"{tok.token_text(t)[:15]!s:<16} " + "  ".join(",".join(map(str, e)) for e in r))
    return "\n".join(lines)


# -- chat ---------------------------------------------------------------------------------------

def cmd_chat(args) -> int:
    from moekit.inference.engine import Engine

    model, tok, defaults = _load(args)
    tok.chat_template()  # no template: one line now, not after the first message
    params = _sampling_params(args, defaults, defaults.eos_ids or tok.eos_ids, default_max=512)
    engine = Engine(model, tok, max_batch=1, prefill_chunk=args.prefill_chunk or None, fast_decode=args.fast_decode)
    history = _fresh_history(args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("moekit chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        cmd = line.strip()
        if cmd == "/exit":
            return 0
        if cmd == "/reset":
            history = _fresh_history(args.system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        ids = _fit_history(history, tok, engine.max_len)
        if ids is None:
            history.pop()
            print(f"moekit chat: this message alone fills the context ({engine.max_len} tokens); "
                  "send a shorter one", file=sys.stderr)
            continue
        reply = "".join(_stream_print(engine, ids, params))
        print(flush=True)
        history.append({"role": "assistant", "content": reply})


def _fit_history(history: list[dict], tok, max_len: int) -> list[int] | None:
    """Token ids of the conversation, dropping its oldest exchanges (never the system message
    or the new message) until it leaves room to reply; None if the new message alone does not.
    ``history`` is trimmed in place and the user is told what went."""
    first = 1 if history and history[0]["role"] == "system" else 0
    trimmed = list(history)
    while len(ids := tok.encode_chat(trimmed)) >= max_len:  # a template that raises: one line, exit 2
        if len(trimmed) - first <= 1:
            return None  # history stays as it was
        # the oldest exchange: a user message and the reply to it
        n = 2 if len(trimmed) - first > 2 and trimmed[first + 1]["role"] == "assistant" else 1
        del trimmed[first: first + n]
    if dropped := len(history) - len(trimmed):
        history[:] = trimmed
        print(f"(dropped the {dropped} oldest messages to fit the context of {max_len} tokens)", file=sys.stderr)
    return ids


def _fresh_history(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def _stream_print(engine, ids, params):
    for piece in engine.stream(ids, params):
        print(piece, end="", flush=True)
        yield piece


__all__ = ["add_parser", "cmd_generate", "cmd_chat", "fit_prompt", "format_routing"]
