"""Reconstruction: AdaRound, BRECQ and QDrop as configurations of one loop."""
from .configs import ALGORITHMS, Algorithm, ReconConfig, Stage, get_algorithm
from .engine import ReconstructionError, default_lambda, quant_mode, reconstruct

__all__ = ["ALGORITHMS", "Algorithm", "ReconConfig", "ReconstructionError", "Stage", "default_lambda",
           "get_algorithm", "quant_mode", "reconstruct"]
