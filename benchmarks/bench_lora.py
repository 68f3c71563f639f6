"""LoRA on routed experts: the cost of a training step and of a decode token (docs/lora.md).

Variants, all on one preset's model (default tiny-moe), interleaved, medians of --reps:
- ``full``: every parameter trains, the fused grouped node (the baseline);
- ``experts``: only the expert matrices train (--train experts), fused node;
- ``lora experts``: moekit's per-expert LoRA, the factored term on each expert's routed rows;
- ``merged-per-forward``: the same adapters the way PEFT's ``target_parameters`` applies them,
  W + s * B A built for every expert on every forward, then the fused node;
- ``lora all``: attention, FFN and expert adapters.
Step = forward + backward + AdamW update on one batch. Decode = one token through the model
(single-token path), adapted against merged.

    python benchmarks/bench_lora.py [--preset tiny-moe] [--batch 4] [--seq 128] [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from moekit.adapt.lora import LoRAConfig, apply_lora, merge_lora
from moekit.adapt.lora_experts import LoRAExperts
from moekit.layers.experts import local_experts
from moekit.model import MoETransformer, lm_loss
from moekit.resolve import resolve_config


class MergedPerForward(LoRAExperts):
    """PEFT's way, for comparison: every expert's W + s * B A materialized each forward."""

    plain = True

    def stacked(self):
        w_in = self.w_in + self.scale * torch.bmm(self.w_in_lora_B, self.w_in_lora_A)  # [E, H, D]
        w_out = self.w_out + self.scale * torch.bmm(self.w_out_lora_B, self.w_out_lora_A)  # [E, D, F]
        return w_in, w_out

    def forward(self, x_TD, plan, impl="grouped"):
        return local_experts(self, x_TD, plan, impl)


def build(preset: str, variant: str, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    model = MoETransformer(resolve_config(preset)[1])
    if variant == "experts":
        for n, p in model.named_parameters():
            p.requires_grad_(".ffn.experts." in n)
    elif variant != "full":
        targets = ["all"] if variant == "lora all" else ["experts"]
        apply_lora(model, LoRAConfig(rank=8, targets=targets))
        if variant == "merged-per-forward":
            for layer in model.moe_layers():
                e = layer.experts
                twin = MergedPerForward.__new__(MergedPerForward)
                twin.__dict__ = e.__dict__
                layer.experts = twin
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n.rpartition(".")[2])
    return model


def step_time(model: nn.Module, opt, batch: torch.Tensor) -> float:
    t = time.perf_counter()
    out = model(batch[:, :-1])
    loss = lm_loss(out, batch[:, 1:]).lm + out.aux_loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


@torch.no_grad()
def decode_time(model: nn.Module, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    model(ids)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["full", "experts", "lora experts", "merged-per-forward", "lora all"]
    models = {v: build(args.preset, v) for v in variants}
    opts = {v: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for v, m in models.items()}
    vocab = models["full"].cfg.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up
        step_time(models[v].train(), opts[v], batch)
    for _ in range(args.reps):  # interleaved
        for v in variants:
            times[v].append(step_time(models[v], opts[v], batch))
    base = statistics.median(times["full"])
    print(f"training step, {args.preset}, batch {args.batch} x {args.seq}, {torch.get_num_threads()} thread(s), "
          f"median of {args.reps}:")
    for v in variants:
        m = statistics.median(times[v])
        trainable = sum(p.numel() for p in models[v].parameters() if p.requires_grad)
        print(f"  {v:20s} {1000 * m:8.1f} ms  {m / base:5.2f}x full   trainable {trainable / 1e6:.3f}M")
    adapted = models["lora experts"].eval()
    merged = build(args.preset, "lora experts").eval()
    merged.load_state_dict(adapted.state_dict())
    merge_lora(merged)
    one = torch.randint(0, vocab, (1, 1))
    dec = {"adapted": [], "merged": []}
    for _ in range(3 * args.reps):
        dec["adapted"].append(decode_time(adapted, one))
        dec["merged"].append(decode_time(merged, one))
    a, m = statistics.median(dec["adapted"]), statistics.median(dec["merged"])
    print(f"decode one token (no cache): adapted {1000 * a:.2f} ms, merged {1000 * m:.2f} ms ({a / m:.2f}x)")


if __name__ == "__main__":
    main()
