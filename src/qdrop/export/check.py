"""Parity of an exported model with the PyTorch simulation, and proof of integer kernels."""
from __future__ import annotations

import collections
import os
import tempfile

import numpy as np
import torch

# Node types of ONNX Runtime's optimised graph that compute on integers.
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
               "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
               "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "QAttention", "NhwcQLinearConv", "QLinearReduceMean"}


def ort_session(path, optimized_path: str | None = None, level: str = "all", threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def optimized_op_counts(path) -> tuple[dict, dict]:
    """Op-type counts of the graph ONNX Runtime actually executes (after its QDQ fusion at the
    'extended' level, saved with SessionOptions.optimized_model_filepath), and the integer ones."""
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = os.path.join(d, "optimized.onnx")
        ort_session(path, optimized_path=opt, level="extended")
        counts = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    integer = {k: v for k, v in sorted(counts.items()) if k in INTEGER_OPS}
    return dict(sorted(counts.items())), integer


@torch.no_grad()
def parity(qmodel, onnx_path, x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 100,
           progress: bool = False, emulate_cpu: str | None = None) -> dict:
    """Run the simulation and ONNX Runtime on the same inputs and compare them; also replay ONNX
    Runtime's integer arithmetic in PyTorch (qdrop.export.emulate) and compare that with it
    ("integer_emulation": what a user can score without the runtime).

    emulate_cpu ("avx2"): run ONNX Runtime under QEMU's model of that CPU instead of natively
    (qdrop.export.x86.run_emulated): the integer results of that CPU's kernels, not its speed."""
    import onnxruntime as ort
    from tqdm import tqdm

    from .emulate import integer_forward
    from .x86 import describe_cpu, run_emulated

    device = next(qmodel.parameters()).device
    qmodel.eval()
    sim = torch.cat([qmodel(x[i:i + batch_size].to(device)).float().cpu()
                     for i in tqdm(range(0, len(x), batch_size), desc="parity (simulation)", disable=not progress)])
    if emulate_cpu:
        xs = np.concatenate([x[i:i + batch_size].cpu().numpy().astype(np.float32) for i in range(0, len(x), batch_size)])
        ort_out, cpu = run_emulated(onnx_path, xs, emulate_cpu)
        ort_out = torch.from_numpy(ort_out)
    else:
        sess = ort_session(onnx_path)
        in_name = sess.get_inputs()[0].name
        ort_out = torch.cat([torch.from_numpy(sess.run(None, {in_name: x[i:i + batch_size].cpu().numpy().astype(np.float32)})[0])
                             for i in range(0, len(x), batch_size)])
        cpu = describe_cpu()
    d = (sim - ort_out).abs()
    sim_pred, ort_pred = sim.argmax(1), ort_out.argmax(1)
    out = dict(samples=len(x), agreement=round(100.0 * (sim_pred == ort_pred).float().mean().item(), 3),
               max_abs_diff=d.max().item(), mean_abs_diff=d.mean().item(), output_abs_max=sim.abs().max().item())
    if y is not None:
        out["sim_top1"] = round(100.0 * (sim_pred == y).float().mean().item(), 2)
        out["ort_top1"] = round(100.0 * (ort_pred == y).float().mean().item(), 2)
    counts, integer = optimized_op_counts(onnx_path)
    ops: dict = {}
    emu = torch.cat([integer_forward(qmodel, x[i:i + batch_size].to(device), ops, kernels=set(integer)).float().cpu()
                     for i in tqdm(range(0, len(x), batch_size), desc="parity (integer emulation)", disable=not progress)])
    emu_pred = emu.argmax(1)
    out["integer_emulation"] = dict(
        agreement=round(100.0 * (emu_pred == ort_pred).float().mean().item(), 3),
        max_abs_diff=(emu - ort_out).abs().max().item(), identical_outputs=bool(torch.equal(emu, ort_out)),
        ops_exact=ops.get("exact", {}), ops_in_float=ops.get("float", {}))
    if y is not None:
        out["integer_emulation"]["top1"] = round(100.0 * (emu_pred == y).float().mean().item(), 2)
    out["integer_nodes"] = integer
    out["integer_node_total"] = sum(integer.values())
    out["optimized_ops"] = counts
    # what ran it: the same file gives other numbers on a CPU whose kernels saturate (qdrop.export.x86)
    out.update(cpu=cpu, ort_version=ort.__version__, graph_optimization_level="all",
               integer_nodes_counted_at="extended")
    return out
