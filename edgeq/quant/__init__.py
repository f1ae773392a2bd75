"""Weight quantization: integer grids (``grid``), GPTQ (``gptq``), BoA (``boa``), OAC's Hessians
(``oac``), aespa's learned rounding (``aespa``), APTQ's width allocation (``aptq``) and the methods
that apply them block by block (``methods``)."""

from edgeq.quant.grid import QuantizedWeight
from edgeq.quant.methods import METHODS, method_class

__all__ = ["METHODS", "QuantizedWeight", "method_class"]
