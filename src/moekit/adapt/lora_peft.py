"""A moekit LoRA adapter written in PEFT's layout, for the Hugging Face export of its base model.

Shape legend: E experts, r rank, D model dim, F expert hidden width (H = 2F for SwiGLU).

PEFT (0.17+) adapts 2-D matrices through ``target_modules`` and fused 3-D expert weights
through ``target_parameters`` (``lora.ParamWrapper``). The name map is interop's
(``interop/names.py``, transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj``):

    moekit                                         PEFT (under base_model.model.)
    blocks.i.attn.wq.lora_A [r, D] / lora_B [out, r]  model.layers.i.self_attn.q_proj.lora_A.weight / lora_B.weight
    blocks.i.ffn.w_in.lora_B [2F, r] (gate | up)    mlp.gate_proj.lora_B = rows [0, F), mlp.up_proj.lora_B = rows
                                                    [F, 2F), both with the same lora_A: exact, rank r each
    ffn.experts.w_in_lora_A [E, r, D]              mlp.experts.base_layer.lora_A.weight [E*r, D]   (expert-major)
    ffn.experts.w_in_lora_B [E, H, r]              mlp.experts.base_layer.lora_B.weight [H, r*E]   (expert fastest)
    ffn.experts.w_out_lora_{A,B}                   mlp.experts.lora_A.weight / lora_B.weight (the outer wrapper)

PEFT reads its 3-D ``lora_A`` as ``reshape(E, r, in)`` and ``lora_B`` as ``reshape(out, r, E)``:
expert e's B is every E-th column starting at e, hence the permute. Two parameters of one
module nest: the first declared (gate_up_proj) is wrapped innermost (``base_layer``). The
scale is lora_alpha / r in both. PEFT refuses dropout on 3-D parameters, and dropout is a
training-time choice anyway, so the exported config says 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moekit.adapt.lora import LoRAConfig, LoRALinear, LoRAMLP, lora_state_dict
from moekit.adapt.lora_experts import LoRAExperts
from moekit.adapt.lora_io import adapted_matrices
from moekit.errors import UsageError

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."
# Model types whose PEFT config PEFT (0.21, transformers 5) rewrites for transformers 4 -> 5
# compatibility: any target_modules entry ending in gate_proj / up_proj / down_proj becomes the
# fused experts' gate_up_proj / down_proj parameter (transformers' conversion_mapping), the
# dense FFNs and shared experts' included. Their adapters on those modules cannot be loaded.
PEFT_REWRITES_FFN_NAMES = ("qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe")


def peft_tensors(model: nn.Module, architecture: str) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The adapters of ``model`` under PEFT's names -> (tensors, target_modules, target_parameters)."""
    from moekit.interop.names import FUSED, export_pieces
    from moekit.interop.registry import family_for_architecture

    cfg = model.cfg
    family = family_for_architecture(architecture)
    hf = family.to_hf(cfg)
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    modules, parameters = [], []
    for name in adapted_matrices(lora_state_dict(model)):
        pieces = export_pieces(name, tuple(params[name].shape), cfg, family, hf, FUSED)
        if name.endswith(("experts.w_in", "experts.w_out")):
            (p,) = pieces
            a, b = params[f"{name}_lora_A"].detach(), params[f"{name}_lora_B"].detach()  # [E, r, in], [E, out, r]
            E, r, _ = a.shape
            inner = "base_layer." if name.endswith("w_in") else ""  # gate_up_proj is wrapped first
            module = p.hf.rpartition(".")[0]
            tensors[f"{PREFIX}{module}.{inner}lora_A.weight"] = a.reshape(E * r, -1)
            tensors[f"{PREFIX}{module}.{inner}lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * E)
            parameters.append(p.hf)
            continue
        owner = name.removesuffix(".weight")
        a, b = params[f"{owner}.lora_A"].detach(), params[f"{owner}.lora_B"].detach()  # [r, in], [out, r]
        for p in pieces:  # one, or gate and up of a fused [gate; up] matrix (rows of B)
            module = p.hf.removesuffix(".weight")
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B.weight"] = p.transform.to_hf(b[p.index])
            modules.append(module)
    return {k: v.contiguous().clone() for k, v in tensors.items()}, sorted(modules), sorted(parameters)


def export_peft(model: nn.Module, cfg: LoRAConfig, folder: str | Path, architecture: str | None = None,
                base_model: str | None = None) -> Path:
    """Write ``model``'s adapters as a PEFT adapter folder (adapter_config.json and
    adapter_model.safetensors) for the Hugging Face ``architecture`` export of its base."""
    from safetensors.torch import save_file

    from moekit.fileio import atomic_path, atomic_write_json
    from moekit.interop.registry import supported_architectures

    arch = architecture or model.cfg.hf_architecture
    if arch is None:
        raise UsageError("this model has no Hugging Face architecture: give --architecture, one of "
                         f"{', '.join(supported_architectures())}")
    if not any(isinstance(m, (LoRALinear, LoRAMLP, LoRAExperts)) for m in model.modules()):
        raise UsageError("the model has no LoRA adapter to export")
    _check_peft_can_load(model, arch)
    _check_plain_experts(model)
    try:
        tensors, modules, parameters = peft_tensors(model, arch)
    except (KeyError, ValueError) as e:
        raise UsageError(f"cannot export these adapters for {arch}: {e}") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / PEFT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(folder / PEFT_CONFIG, dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model, r=cfg.rank,
        lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none", fan_in_fan_out=False, use_rslora=False,
        target_modules=modules or None, target_parameters=parameters or None, inference_mode=True))
    return folder


def _check_plain_experts(model: nn.Module) -> None:
    """GPT-OSS's and DeepSeek-V4's routed experts (biases, clamped SwiGLUs; GPT-OSS's gate and
    up interleaved in its checkpoint) have no tested PEFT mapping here: refused, not guessed."""
    odd = [n for n, m in model.named_modules() if isinstance(m, LoRAExperts) and m.rank and (m.has_bias or m.act_args)]
    if odd:
        raise UsageError(f"cannot export adapters of experts with biases or activation={model.get_submodule(odd[0]).activation!r} "
                         f"(GPT-OSS, DeepSeek-V4; {odd[0]}) in PEFT's layout; merge them instead (moekit lora merge)")


def _check_peft_can_load(model: nn.Module, arch: str) -> None:
    from moekit.interop.registry import family_for_architecture

    model_type = family_for_architecture(arch).model_type
    ffn = sorted(n for n in adapted_matrices(lora_state_dict(model))
                 if (".ffn.w_" in n or ".ffn.shared." in n))
    if model_type in PEFT_REWRITES_FFN_NAMES and ffn:
        raise UsageError(f"PEFT (under transformers 5) turns every gate_proj/up_proj/down_proj target of a {model_type} "
                         f"model into its fused experts, so the dense-FFN / shared-expert adapters ({ffn[0]}, ...) "
                         "cannot be loaded there: train with --lora-targets attention,experts, or use moekit lora merge")


__all__ = ["export_peft", "peft_tensors", "PEFT_WEIGHTS", "PEFT_CONFIG"]
