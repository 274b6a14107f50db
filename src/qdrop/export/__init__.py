"""Deployment: ONNX QDQ export, parity with the simulation, backend encodings."""
from .check import INTEGER_OPS, optimized_op_counts, parity
from .onnx_qdq import ExportError, ExportReport, export_onnx

__all__ = ["ExportError", "ExportReport", "INTEGER_OPS", "export_onnx", "optimized_op_counts", "parity"]
