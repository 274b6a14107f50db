"""Quantizers, observers and schemes."""
from .observers import OBSERVERS, make_observer, mse_search
from .quantizer import Quantizer
from .scheme import QScheme, parse_bits, qparams_from_range

__all__ = ["OBSERVERS", "QScheme", "Quantizer", "make_observer", "mse_search", "parse_bits", "qparams_from_range"]
