"""Perplexity with fp32 / bf16 / int8 / int4 weights (docs/results.md, "Quantized experts").

1. A trained run (``moekit train ...``): validation perplexity on the run's held-out windows.
2. Tiny random Hugging Face models of every MoE family (tests/hf_tiny.py): perplexity on
   text their fp32 selves sampled (random weights have no corpus; their own samples are the
   text they predict best), so the numbers show how far each format moves the model.

Variants: fp32; bf16 weights and activations (routers fp32); int8 / int4 experts with the
rest fp32; int8 / int4 over every scope (experts, shared, attention, dense).

    python benchmarks/quant_quality.py --run RUN_DIR [--batches 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from moekit.model import MoETransformer, lm_loss  # noqa: E402
from moekit.quant.convert import SCOPES, QuantConfig, quantize_model  # noqa: E402

VARIANTS = {  # name -> (weights dtype, quantization or None)
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8 experts": (torch.float32, QuantConfig(bits=8)),
    "int4 experts (g64)": (torch.float32, QuantConfig(bits=4, group_size=64)),
    "int4 experts (g32)": (torch.float32, QuantConfig(bits=4, group_size=32)),
    "int8 all": (torch.float32, QuantConfig(bits=8, scope=SCOPES)),
    "int4 all (g32)": (torch.float32, QuantConfig(bits=4, group_size=32, scope=SCOPES)),
}


@torch.inference_mode()
def perplexity(model: MoETransformer, batches: list[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    for b in batches:
        out = model(b[:, :-1])
        nll += float(lm_loss(out, b[:, 1:]).lm) * b[:, 1:].numel()
        n += b[:, 1:].numel()
    return math.exp(nll / n)


def variant(make, dtype: torch.dtype, q: QuantConfig | None) -> MoETransformer:
    model = make()
    if dtype != torch.float32:
        model.to(dtype)
        for layer in model.moe_layers():
            layer.router.float()
    if q is not None:
        quantize_model(model, q)
    return model.eval()


def table(title: str, make, batches, variants=VARIANTS) -> list[str]:
    lines = [f"| {title} | perplexity | vs fp32 |", "|---|---:|---:|"]
    base = None
    for name, (dtype, q) in variants.items():
        try:
            ppl = perplexity(variant(make, dtype, q), batches)
        except ValueError as e:  # e.g. int4 groups that do not divide a tiny model's widths
            lines.append(f"| {name} | n/a ({e}) | |")
            continue
        base = base or ppl
        lines.append(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f} % |")
        print(lines[-1], flush=True)
    return lines


def trained_run(run_dir: str, batches: int) -> list[str]:
    from moekit.training.run import load_run

    run = load_run(run_dir)
    vb = run.validation_batches(max_batches=batches, log=lambda *_: None)
    tokens = sum(b[:, 1:].numel() for b in vb)
    title = f"{Path(run_dir).name} step {run.step}, {tokens:,} held-out tokens"
    return table(title, lambda: load_run(run_dir).model, vb)


def hf_family(arch: str, seqs: int = 8, length: int = 48) -> list[str]:
    import tempfile

    import hf_tiny
    from transformers import set_seed

    from moekit.interop import from_pretrained

    set_seed(0)
    with tempfile.TemporaryDirectory() as d:
        hf_tiny.randomize(hf_tiny.build(arch)).save_pretrained(d)
        fp32 = from_pretrained(d)
        torch.manual_seed(0)
        ids = torch.randint(0, hf_tiny.VOCAB, (seqs, 1))
        with torch.inference_mode():
            for _ in range(length):  # sample from the fp32 model at temperature 1
                probs = torch.softmax(fp32(ids).logits[:, -1].float(), -1)
                ids = torch.cat([ids, torch.multinomial(probs, 1)], 1)
        int8_only = {k: v for k, v in VARIANTS.items() if "int4" not in k}  # tiny widths: int4 groups rarely divide
        return table(f"tiny random {arch}", lambda: from_pretrained(d), [ids], int8_only)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a run folder written by moekit train")
    p.add_argument("--batches", type=int, default=8, help="validation batches of the run (default: 8)")
    p.add_argument("--families", default="mixtral,qwen2_moe,qwen3_moe,olmoe,deepseek_v3",
                   help="tiny random HF families (comma list; empty for none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = []
    if args.run:
        out += trained_run(args.run, args.batches) + [""]
    for arch in [a for a in args.families.split(",") if a]:
        out += hf_family(arch) + [""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
