"""Scaling out on torch.distributed: expert parallelism (all-to-all) and data parallelism
(DDP or FSDP2), applied to a built single-device model from outside.

    mesh.py         the [dp, ep] process-group layout, checked; ``init_mesh`` under torchrun
    dispatcher.py   the all-to-all experts: rows to the rank holding their expert and back
    collectives.py  all-to-all and all-reduce as autograd Functions (backward = the adjoint)
    parallelize.py  ``parallelize(model, ctx, pcfg)`` and the step's helpers (grad norm,
                    all-reduced balancing state)

See docs/distributed.md for launching, what each flag shards, and the arithmetic.
"""
