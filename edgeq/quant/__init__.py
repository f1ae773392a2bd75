"""Weight quantizers. Each method is a small class per linear layer:

    quantizer = METHODS[name](layer, config)
    quantizer.add_batch(x)          # x [..., in]: the layer's input on calibration data
    qweight = quantizer.quantize()  # QuantizedWeight

The pipeline (``edgeq.pipeline``) drives them block by block.
"""

from __future__ import annotations

from edgeq.errors import EdgeqError
from edgeq.quant.grid import QuantizedWeight
from edgeq.quant.rtn import RTN

METHODS = {"rtn": RTN}


def quantizer_class(method: str):
    try:
        return METHODS[method]
    except KeyError:
        raise EdgeqError(f"unknown method '{method}': choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "QuantizedWeight", "RTN", "quantizer_class"]
