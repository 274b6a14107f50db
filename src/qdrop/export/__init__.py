"""Deployment: ONNX QDQ export, parity with the simulation, ONNX Runtime's integer arithmetic in PyTorch, backend encodings."""
from .check import INTEGER_OPS, optimized_op_counts, parity
from .emulate import IntegerModel, integer_forward
from .onnx_qdq import ExportError, ExportReport, export_onnx

__all__ = ["ExportError", "ExportReport", "INTEGER_OPS", "IntegerModel", "export_onnx", "integer_forward", "optimized_op_counts", "parity"]
