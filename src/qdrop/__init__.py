"""qdrop: post-training quantization for PyTorch (naive PTQ, AdaRound, BRECQ, QDrop).

    qmodel = qdrop.prepare(model, example_inputs, backend="academic", bits="w4a4")
    qdrop.calibrate(qmodel, batches)
    qdrop.reconstruct(qmodel, None, calib_inputs, algo="qdrop", iters=20000)
    qdrop.export_onnx(qmodel, "model.onnx", example_inputs)
"""
from .api import calibrate, export_onnx, prepare, reconstruct
from .errors import QdropError
from .graph import describe, set_quant_state
from .pipeline import QuantizeJob, run_export, run_quantize

__version__ = "0.1.0"
__all__ = ["QdropError", "QuantizeJob", "calibrate", "describe", "export_onnx", "prepare", "reconstruct", "run_export",
           "run_quantize", "set_quant_state"]
