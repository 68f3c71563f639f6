"""Expert offloading: experts on disk or in RAM, a per-layer cache of the hot ones in the
fast tier, prefetch of the next layer's likely experts. Applied from outside at the
expert-weights seam (``layers/weights.py``); see ``docs/design.md``.

``policies.py`` (eviction policies) is pure Python and shared with the routing-trace planner.
"""
