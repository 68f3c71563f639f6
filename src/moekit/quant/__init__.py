"""Weight-only int8/int4 quantization of experts (and, by scope, shared experts, attention and
dense FFNs): ``quantize_model`` swaps modules for quantized twins after loading; see convert.py.

The names below are imported on first use (``moekit.lazy``): ``moekit quantize --help`` and the
other subcommands' parsers start without torch.
"""

from moekit.lazy import lazy_exports

_EXPORTS = {
    "QuantConfig": "moekit.quant.convert",
    "Coverage": "moekit.quant.convert",
    "quantize_model": "moekit.quant.convert",
    "quantize_at_load": "moekit.quant.convert",
    "save_quantized": "moekit.quant.checkpoint",
    "load_quantized": "moekit.quant.checkpoint",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
