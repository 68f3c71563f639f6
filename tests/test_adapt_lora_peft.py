"""A moekit LoRA adapter exported in PEFT's layout: PEFT loads it onto the transformers model
(fused experts through ``target_parameters``) and computes moekit's logits."""

import pytest
import torch

import moekit
from moekit.adapt.lora import LoRAConfig, apply_lora, is_lora_parameter
from moekit.adapt.lora_peft import export_peft

peft = pytest.importorskip("peft")
import hf_tiny  # noqa: E402


@pytest.mark.parametrize("arch, targets", [("qwen3_moe", ["attention", "experts"]),
                                           ("qwen2_moe", ["attention", "experts"]),
                                           ("mixtral", ["all"]), ("llama", ["all"])])
def test_peft_loads_the_exported_adapter_and_computes_the_same_logits(arch, targets, tmp_path):
    torch.manual_seed(0)
    ref = hf_tiny.build(arch)
    ref.save_pretrained(tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf").eval()
    cfg = LoRAConfig(rank=3, alpha=7.0, targets=targets)
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_lora_parameter(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.randint(0, hf_tiny.VOCAB, (2, hf_tiny.SEQ), generator=g)
    ours = model(ids).logits.float()
    export_peft(model, cfg, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(hf_tiny.build(arch).__class__.from_pretrained(tmp_path / "hf"),
                                                tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits.float()
        base = ref(input_ids=ids).logits.float()
    assert (ours - base).abs().max() > 1e-2  # the adapters change the output
    assert (ours - theirs).abs().max() < 1e-4
    # every exported tensor was loaded: PEFT's state dict holds exactly them
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    loaded = peft.get_peft_model_state_dict(peft_model)
    assert set(saved) == set(loaded)
    assert any("experts.base_layer.lora_B" in k for k in saved) == (arch != "llama")


def test_peft_export_refuses_ffn_adapters_peft_would_misplace(tmp_path):
    from moekit.errors import UsageError

    ref = hf_tiny.build("qwen3_moe")
    ref.save_pretrained(tmp_path / "hf")
    model = moekit.from_pretrained(tmp_path / "hf")
    apply_lora(model, LoRAConfig(rank=2, targets=["dense", "experts"]))
    with pytest.raises(UsageError, match="cannot be loaded there"):
        export_peft(model, LoRAConfig(rank=2), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
