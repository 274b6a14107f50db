"""Capture a model as a torch.fx graph, with errors that name the module that failed."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import fx, nn

from ..quant.layers import QUANTIZABLE
from ..errors import TraceError, UsageError


class QTracer(fx.Tracer):
    """fx tracer whose leaves are the standard torch.nn layers plus the user's leaves.

    leaf_modules holds qualified names ('layer1.0') and/or module classes.
    """

    def __init__(self, leaf_modules: Iterable = ()):
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if isinstance(m, QUANTIZABLE):  # also subclasses with their own forward: quantized as one layer
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self._stack.append((name, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError:
            raise
        except Exception as e:  # the innermost module that failed is the one to name
            raise TraceError(name, type(m).__name__, e) from e
        finally:
            self._stack.pop()


def trace(model: nn.Module, leaf_modules: Iterable = ()) -> fx.GraphModule:
    leaf_modules = list(leaf_modules)
    known = {n for n, _ in model.named_modules()}
    missing = [m for m in leaf_modules if isinstance(m, str) and m not in known]
    if missing:
        raise UsageError(f"leaf module(s) {missing} not found in {type(model).__name__}")
    tracer = QTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except TraceError:
        raise
    except Exception as e:  # the user's forward failed to trace: name it (the cause stays chained)
        raise TraceError("", type(model).__name__, e) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def record_values(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run the graph once and store in node.meta['tensor'] whether each value is a
    floating-point tensor (only those can carry an activation quantizer)."""

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["tensor"] = isinstance(out, torch.Tensor) and out.is_floating_point()
            if n.meta["tensor"]:
                n.meta["shape"] = tuple(out.shape)
            return out

    with torch.no_grad():
        _Recorder(gm).run(*example_inputs)
    # inputs beyond the examples ran at their defaults (optional arguments such as attn_mask=None)
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        n.meta["default_used"] = i >= len(example_inputs)


def module_stack(node: fx.Node) -> list[tuple[str, type]]:
    """(qualified name, class) of the modules whose forwards created this node, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, cls) for path, cls in stack.values()]
