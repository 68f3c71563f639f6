"""Adapting trained models: sparse upcycling (dense -> MoE), fine-tuning policies, distillation.

Each is a caller of the trainer seam (``moekit.training.train`` takes a model, a loss function
and a parameter filter), never a fork of it.
"""
