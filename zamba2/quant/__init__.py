"""Weight-only int8 / int4 quantized linear layers for bandwidth-bound CPU decode.

Batch-1 decode reads every weight once per token, so its speed is memory bandwidth / weight bytes.
Storing weights as int8 (1 byte) or int4 (half a byte) and letting torch's fused CPU kernels dequantise
on the fly cuts those bytes by 2x / ~3.5x against bf16. Activations stay in the model dtype.

    schemes.py   the int8 / int4 schemes as pure functions: quantise, dequantise, nibble packing
    linear.py    QuantizedLinear: the persisted format, the fused CPU kernels and their reference path
    model.py     `quantize_model`, `quantization_config`, `apply_quantization_config`

Every name of the former single module zamba2/quant.py is importable from here; its private helpers are
re-exported as `_name as _name` (they are not part of the API). Module state that code changes or tests
patch (`FORCE_REFERENCE`, `DEQUANTIZE_ROWS`) lives in zamba2.quant.linear: read or patch it there.
"""

from zamba2.quant.linear import _INT4_ROW_MULTIPLE as _INT4_ROW_MULTIPLE
from zamba2.quant.linear import _ROW_CHUNK as _ROW_CHUNK
from zamba2.quant.linear import _SCRATCH as _SCRATCH
from zamba2.quant.linear import (
    DEQUANTIZE_ROWS,
    FORCE_REFERENCE,
    KERNEL_DTYPES,
    QuantizedLinear,
    reference_kernels,
)
from zamba2.quant.linear import _scratch as _scratch
from zamba2.quant.model import _split_name as _split_name
from zamba2.quant.model import (
    apply_quantization_config,
    default_quantize_filter,
    quantization_config,
    quantize_model,
)
from zamba2.quant.schemes import _TINY as _TINY
from zamba2.quant.schemes import (
    GROUP_SIZES,
    MODES,
    check_group_size,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from zamba2.quant.schemes import _check_weight as _check_weight

__all__ = [
    "DEQUANTIZE_ROWS",
    "FORCE_REFERENCE",
    "GROUP_SIZES",
    "KERNEL_DTYPES",
    "MODES",
    "QuantizedLinear",
    "apply_quantization_config",
    "check_group_size",
    "default_quantize_filter",
    "dequantize_int4",
    "dequantize_int8",
    "pack_int4",
    "quantization_config",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "reference_kernels",
    "unpack_int4",
]
