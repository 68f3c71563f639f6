"""Weight-only int8/int4 quantization of experts (and, by scope, shared experts, attention and
dense FFNs): ``quantize_model`` swaps modules for quantized twins after loading; see convert.py."""

from moekit.quant.checkpoint import load_quantized, save_quantized
from moekit.quant.convert import Coverage, QuantConfig, quantize_model

__all__ = ["QuantConfig", "Coverage", "quantize_model", "save_quantized", "load_quantized"]
