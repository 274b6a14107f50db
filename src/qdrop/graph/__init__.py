"""Graph capture, BN folding, quantizer insertion and partition into units."""
from .capture import TraceError, trace
from .fold import fold_batchnorm
from .prepare import PRESETS, PrepareConfig, describe, prepare, quantizers, set_quant_state
from .units import PartitionError, Unit, block_units, layer_units, subgraph

__all__ = ["PRESETS", "PartitionError", "PrepareConfig", "TraceError", "Unit", "block_units", "describe",
           "fold_batchnorm", "layer_units", "prepare", "quantizers", "set_quant_state", "subgraph", "trace"]
