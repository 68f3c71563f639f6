"""torch.profiler table of one MoELayer forward+backward (the profile in docs/benchmarks.md).

    python benchmarks/profile_layer.py --shape fine --tokens 4096
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from moekit import MoEConfig, MoELayer

SHAPES = {  # the shapes of `moekit bench layer`
    "coarse": dict(d_model=512, d_expert=1792, num_experts=8, top_k=2),
    "fine": dict(d_model=512, d_expert=256, num_experts=64, top_k=8),
    "fine+shared": dict(d_model=512, d_expert=256, num_experts=64, top_k=6, num_shared_experts=2),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="fine")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="profiled steps, after 2 warm-up steps")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**SHAPES[args.shape]))
    x = torch.randn(1, args.tokens, layer.cfg.d_model, requires_grad=True)

    def step() -> None:
        layer(x).sum().backward()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
