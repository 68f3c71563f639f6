"""``moekit quantize``: a model (Hugging Face folder, training run or preset) -> a quantized folder.

Prints the coverage report (parameters and bytes per module kind before and after) and exits 2,
writing nothing, if any matrix inside the chosen scope stayed floating point.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from moekit.argtypes import nonneg_int, positive_int
from moekit.errors import UsageError

# files of a model folder that are not weights and travel with it (tokenizer, generation defaults)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def load_float_model(target: str, seed: int = 0):
    """A Hugging Face folder, a moekit run folder (its last checkpoint) or a preset (random
    weights, for trying things) -> (model in eval mode, folder to copy side files from or None)."""
    import torch

    from moekit.interop import from_pretrained
    from moekit.model import MoETransformer
    from moekit.presets import PRESETS, get_preset
    from moekit.quant.checkpoint import is_quantized_config
    from moekit.training.run import is_run_dir, load_run

    path = Path(target)
    if path.is_dir() and is_run_dir(path):
        return load_run(path).model, path
    if path.is_dir():
        from moekit.fileio import read_json_object

        config = path / "config.json"
        if config.is_file() and is_quantized_config(read_json_object(config)):
            raise UsageError(f"{target} is already quantized; quantize its float original instead")
        return from_pretrained(path), path
    if target in PRESETS:
        torch.manual_seed(seed)
        return MoETransformer(get_preset(target)).eval(), None
    raise UsageError(f"{target}: not a model folder, a moekit run folder or a preset name")


def cmd_quantize(args) -> int:
    from moekit.quant.checkpoint import save_quantized
    from moekit.quant.convert import QuantConfig, quantize_model

    qcfg = QuantConfig(bits=args.bits, group_size=args.group_size, scope=tuple(_scope(args.quantize_scope)),
                       reference=args.reference)
    qcfg.check_supported()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} exists and is not empty (pass --overwrite to replace its weights)")
    model, source = load_float_model(args.model, args.seed)
    cov = quantize_model(model, qcfg, progress=_progress)
    print(json.dumps(cov.to_dict(), indent=2) if args.json else cov.format())
    if cov.float_in_scope:
        print(f"moekit quantize: error: {len(cov.float_in_scope)} matrix(es) in scope stayed floating point "
              f"(first: {cov.float_in_scope[0]}); nothing written", file=sys.stderr)
        return 2
    save_quantized(model, out)
    for name in SIDE_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _scope(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _progress(i: int, n: int, name: str) -> None:
    if sys.stderr.isatty():  # one line that updates in place
        print(f"\rquantizing {i}/{n}: {name:<40}", end="\n" if i == n else "", file=sys.stderr, flush=True)
    elif i == n or i % max(1, n // 10) == 0:  # a log: about ten lines
        print(f"quantizing {i}/{n}: {name}", file=sys.stderr, flush=True)


def add_load_args(s) -> None:
    """``--quantize`` and its options on a command that loads a model (generate, chat, trace)."""
    s.add_argument("--quantize", type=positive_int, choices=(8, 4), default=None,
                   help="quantize at load: 8 (int8 per output channel) or 4 (int4 groups); a folder written by "
                        "moekit quantize loads quantized without it")
    # None = not given: without --quantize they would change nothing, which is an error, not a no-op
    s.add_argument("--group-size", type=positive_int, choices=(32, 64, 128, 256), default=None,
                   help="with --quantize 4: input features per scale/zero (default: 64)")
    s.add_argument("--quantize-scope", default=None, metavar="KINDS",
                   help="with --quantize: comma list of experts, shared, attention, dense (default: experts)")
    s.add_argument("--reference", action="store_true",
                   help="int4 without torch's kernel: dequantize-then-matmul (slow; for a torch that lacks the op)")


def quant_config(args):
    """The QuantConfig that ``add_load_args``' flags ask for (None without --quantize)."""
    if args.quantize is None:
        if given := [f for f, v in (("--group-size", args.group_size), ("--quantize-scope", args.quantize_scope))
                     if v is not None]:
            raise UsageError(f"{given[0]} needs --quantize 8 or --quantize 4 (it sets how to quantize at load)")
        return None
    from moekit.quant.convert import QuantConfig

    return QuantConfig(bits=args.quantize, group_size=args.group_size or 64,
                       scope=tuple(_scope(args.quantize_scope or "experts")), reference=args.reference)


def add_parser(sub) -> None:
    s = sub.add_parser("quantize", help="write an int8/int4 weight-only quantized copy of a model")
    s.add_argument("model", help="a Hugging Face model folder, a moekit run folder, or a preset name (random weights)")
    s.add_argument("--bits", type=positive_int, choices=(8, 4), required=True,
                   help="8: int8 per output channel; 4: int4 groups with scales and zero points")
    s.add_argument("--group-size", type=positive_int, choices=(32, 64, 128, 256), default=64, help="int4: input features per scale/zero (32, 64, 128 or 256; default 64)")
    s.add_argument("--quantize-scope", default="experts", metavar="KINDS",
                   help="comma-separated module kinds: experts, shared, attention, dense (default: experts)")
    s.add_argument("--reference", action="store_true",
                   help="int4 without torch's kernel: dequantize-then-matmul (slow; for a torch that lacks the op)")
    s.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    s.add_argument("--seed", type=nonneg_int, default=0, help="seed of a preset's random weights (default: 0)")
    s.add_argument("--json", action="store_true", help="print the coverage report as JSON")
    s.set_defaults(func=cmd_quantize)


__all__ = ["add_parser", "cmd_quantize", "load_float_model", "add_load_args", "quant_config"]
