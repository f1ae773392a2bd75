"""Round-to-nearest: the baseline every calibrated method must beat."""

from __future__ import annotations

import torch
from torch import nn

from edgeq.config import WeightQuantConfig
from edgeq.quant.grid import QuantizedWeight, rtn_quantize


class RTN:
    """Needs no calibration data: each weight goes to its nearest grid point."""

    needs_activations = False

    def __init__(self, layer: nn.Linear, config: WeightQuantConfig):
        self.layer = layer
        self.config = config

    def add_batch(self, x: torch.Tensor) -> None:
        """RTN ignores activations."""

    def quantize(self) -> QuantizedWeight:
        return rtn_quantize(self.layer.weight.data, self.config)
