"""Cheap measurements of causes inside moekit that could hold an MoE (or a wider dense model)
back in the scaling experiment (issue 20), at initialization, without training:

1. the scale of every FFN's output at init, relative to its (RMS-normalized) input, for the
   scaling experiment's variants: tiny-dense (FFN 1024), tiny-moe (two renormalized experts of
   512), fine-grained (8 of 64 experts of 112, renormalized, + a shared 128), dense-total (FFN
   4096), and tiny-moe with ``routed_scaling_factor`` 2 (which would undo the halving);
2. the auxiliary losses' share at init: the loss they add and the router gradient they bring
   against the language-model loss's, for tiny-moe's preset (Switch balance 0.01 + ST-MoE
   z-loss 1e-3) and each term alone, and the z-loss's value at init.

    python benchmarks/scaling_init.py [--seeds 5] [--batches 4] [--json docs/results/scaling-init.json]

Inputs are real training batches of the default corpus (8 x 128 tokens, BPE 8192), the same
for every model and seed; a seed changes the initial weights only. Numbers are means over
seeds and layers, with the range over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch


def variants():
    from moekit.experiments import EXPERIMENTS

    vs = {v.name: v.model for v in EXPERIMENTS["scaling"].variants()}
    moe = vs["tiny-moe"]
    vs["tiny-moe, routed x2"] = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, routed_scaling_factor=2.0))
    return vs


def ffn_scale(model, batches) -> list[float]:
    """Per layer: RMS of the FFN's output / RMS of its input, pooled over the batches."""
    sums: dict[int, list[float]] = {}

    def hook(layer_id):
        def record(module, args, output):
            x = args[0]
            s = sums.setdefault(layer_id, [0.0, 0.0])
            s[0] += output.float().pow(2).mean().item()
            s[1] += x.float().pow(2).mean().item()
        return record

    handles = [b.ffn.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        for batch in batches:
            model(batch[:, :-1])
    for h in handles:
        h.remove()
    return [(out / inp) ** 0.5 for _, (out, inp) in sorted(sums.items())]


def router_gradients(model, batch) -> dict:
    """LM loss and balancing loss at init; the norm of each one's gradient on the routers."""
    from moekit.model import lm_loss

    routers = [p for n, p in model.named_parameters() if ".router." in n]
    out = model(batch[:, :-1])
    parts = lm_loss(out, batch[:, 1:])
    g_lm = torch.autograd.grad(parts.lm, routers, retain_graph=True)
    g_aux = torch.autograd.grad(parts.aux, routers)
    norm = lambda gs: torch.sqrt(sum(g.pow(2).sum() for g in gs)).item()  # noqa: E731
    return dict(lm=parts.lm.item(), aux=parts.aux.item(), router_grad_lm=norm(g_lm), router_grad_aux=norm(g_aux))


def z_loss_at_init(model, batch) -> float:
    from moekit.losses import router_z_loss

    zs = []
    hooks = [layer.router.register_forward_hook(lambda m, a, out: zs.append(router_z_loss(out.logits).item()))
             for layer in model.moe_layers()]
    with torch.no_grad():
        model(batch[:, :-1])
    for h in hooks:
        h.remove()
    return statistics.mean(zs)


def summary(values: list[float]) -> dict:
    return dict(mean=statistics.mean(values), min=min(values), max=max(values))


def main(argv=None) -> int:
    from moekit.data.dataset import DataConfig, prepare_data, train_batch
    from moekit.model import MoETransformer
    from moekit.training.loop import fit_model_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="initializations per model (default 5)")
    ap.add_argument("--batches", type=int, default=4, help="training batches of 8 x 128 tokens (default 4)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = prepare_data(DataConfig(), log=lambda s: None)
    batches = [train_batch(data.train, 8, 128, 0, i) for i in range(args.batches)]
    result = dict(scale={}, balancing={}, z_loss={})
    for name, cfg in variants().items():
        cfg = fit_model_config(cfg, data.tokenizer, 128)
        per_seed = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            per_seed.append(statistics.mean(ffn_scale(MoETransformer(cfg).eval(), batches)))
        result["scale"][name] = summary(per_seed)
        print(f"{name:<22} FFN output RMS / input RMS at init: {result['scale'][name]['mean']:.4f} "
              f"(seeds {result['scale'][name]['min']:.4f}-{result['scale'][name]['max']:.4f})")
    base = result["scale"]["tiny-dense"]["mean"]
    for name, s in result["scale"].items():
        s["vs_tiny_dense"] = s["mean"] / base
    print("relative to tiny-dense: " + ", ".join(f"{n} {s['vs_tiny_dense']:.3f}" for n, s in result["scale"].items()))
    moe = fit_model_config(variants()["tiny-moe"], data.tokenizer, 128)
    for label, lb, z in (("preset: balance 0.01, z 1e-3", 0.01, 1e-3), ("balance 0.01 only", 0.01, 0.0),
                         ("balance 0.001 only", 0.001, 0.0), ("z 1e-3 only", 0.0, 1e-3)):
        cfg = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, load_balance_coef=lb, z_loss_coef=z))
        rows = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            rows.append(router_gradients(MoETransformer(cfg).train(), batches[0]))
        r = {k: statistics.mean(x[k] for x in rows) for k in rows[0]}
        result["balancing"][label] = r
        print(f"{label:<30} lm loss {r['lm']:.4f}, weighted aux losses {r['aux']:.5f} "
              f"({100 * r['aux'] / r['lm']:.2f} % of the lm loss); router gradient norm: lm {r['router_grad_lm']:.4f}, "
              f"aux {r['router_grad_aux']:.4f} ({r['router_grad_aux'] / r['router_grad_lm']:.2f}x)")
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        result["z_loss"].setdefault("values", []).append(z_loss_at_init(MoETransformer(moe).eval(), batches[0]))
    z = statistics.mean(result["z_loss"]["values"])
    print(f"router z-loss at init (mean over layers, seeds): {z:.4f}; x 1e-3 (ST-MoE) = {1e-3 * z:.5f} nats")
    if args.json:
        from moekit.fileio import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
