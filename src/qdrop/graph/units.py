"""Partition a prepared graph into reconstruction units.

Block units: cut the graph wherever exactly one value is live (a residual block and
its shortcut stay together, because the block input is live until the add). Pieces
without a quantized layer join the previous piece; consecutive pieces created by the
same module (the first enclosing module that is not a plain container) are merged,
so a block whose pieces are chained without a skip still forms one unit.

Layer units: one quantized layer plus the elementwise activation that directly follows it.

No model name appears here: only graph structure and module nesting.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from ..errors import PartitionError
from ..quant.layers import QuantLayer
from ..quant.quantizer import Quantizer
from .capture import module_stack

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish)
_ACTIVATION_NAMES = {"relu", "relu_", "relu6", "hardtanh", "hardswish", "silu", "gelu", "leaky_relu", "sigmoid", "tanh", "elu", "mish", "clamp"}


@dataclass
class Unit:
    name: str
    kind: str  # "block" or "layer"
    nodes: list  # fx.Nodes in graph order
    input: fx.Node
    output: fx.Node
    layers: list = field(default_factory=list)  # QuantLayer targets
    act_quants: list = field(default_factory=list)  # Quantizer targets

    def __repr__(self):
        return f"Unit({self.name!r}, {self.kind}, layers={self.layers}, act_quants={len(self.act_quants)})"


def _is_layer(gm, n) -> bool:
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantLayer)


def _is_quantizer(gm, n) -> bool:
    return n.op == "call_module" and isinstance(gm.get_submodule(n.target), Quantizer)


def _is_container(cls) -> bool:
    """Sequential/ModuleList/ModuleDict, or a subclass that keeps their forward (e.g. a
    stage built as a Sequential subclass): it only groups modules, it is not a block."""
    if not (isinstance(cls, type) and issubclass(cls, _CONTAINERS)):
        return False
    return cls.forward in (nn.Sequential.forward, nn.Module.forward)


def _block_module(n: fx.Node) -> str:
    """First enclosing module that is not a plain container ('' at the root)."""
    for path, cls in module_stack(n):
        if not _is_container(cls):
            return path
    return ""


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        out.append(group[0])
    return ".".join(out)


def _make_unit(gm, nodes, inp, out, kind, name=None) -> Unit:
    layers = [str(n.target) for n in nodes if _is_layer(gm, n)]
    acts = [str(n.target) for n in nodes if _is_quantizer(gm, n)]
    if name is None:
        blocks = list(dict.fromkeys(_block_module(n) for n in nodes if _is_layer(gm, n)))
        name = blocks[0] if len(blocks) == 1 else (_common_prefix(blocks) or "+".join(blocks))
    return Unit(name or "root", kind, list(nodes), inp, out, layers, acts)


def block_units(gm: fx.GraphModule) -> list[Unit]:
    graph_nodes = list(gm.graph.nodes)
    placeholders = [n for n in graph_nodes if n.op == "placeholder"]
    body = [n for n in graph_nodes if n.op not in ("placeholder", "output", "get_attr")]
    pos = {n: i for i, n in enumerate(body)}
    end = len(body)
    last_use = {}
    for n in placeholders + body:
        uses = [pos.get(u, end) if u.op != "get_attr" else end for u in n.users]
        last_use[n] = max(uses, default=-1)

    # walk positions: live values after node i (a batch size is not a value that must
    # flow between units: subgraph() recomputes it from the unit's own input)
    live = {n for n in placeholders if last_use[n] >= 0 and not _is_constant_input(n)}
    pieces, cur, cur_in = [], [], (next(iter(live)) if len(live) == 1 else None)
    for i, n in enumerate(body):
        cur.append(n)
        if last_use[n] > i and not _is_batch_size(n):
            live.add(n)
        live = {v for v in live if last_use[v] > i}
        if len(live) == 1 and i < end - 1:
            (value,) = live
            nxt = body[i + 1]
            if _is_quantizer(gm, nxt) and nxt.args[0] is value:
                continue  # a value's quantizer belongs with the unit that produced the value
            pieces.append((cur, cur_in, value))
            cur, cur_in = [], value
    out_node = next(n for n in graph_nodes if n.op == "output")
    out_value = out_node.args[0] if isinstance(out_node.args[0], fx.Node) else None
    pieces.append((cur, cur_in, out_value))

    # pieces without layers join a neighbour; pieces of the same block module merge
    merged: list[list] = []  # [nodes, input, output, block modules of its layers]
    for nodes, inp, out in pieces:
        key = {_block_module(n) for n in nodes if _is_layer(gm, n)}
        prev = merged[-1] if merged else None
        if prev is not None and (not key or not prev[3] or (len(key) == 1 and key == prev[3])):
            # layer-less piece, leading layer-less piece, or the same module: extend
            prev[0], prev[2], prev[3] = prev[0] + nodes, out, prev[3] or key
        else:
            merged.append([list(nodes), inp, out, key])
    units = []
    for nodes, inp, out, _ in merged:
        if inp is None:
            raise PartitionError(
                "the graph has no point where a single tensor enters the first unit "
                f"(inputs: {[p.name for p in placeholders]}); block reconstruction needs a single-input chain"
            )
        if out is None:
            raise PartitionError("the model output is not a single tensor; block reconstruction needs one")
        units.append(_make_unit(gm, nodes, inp, out, "block"))
    return units


def layer_units(gm: fx.GraphModule, block: Unit) -> list[Unit]:
    """Layer units inside one block unit: each quantized layer with its activation."""
    units = []
    inside = set(block.nodes)
    for n in block.nodes:
        if not _is_layer(gm, n):
            continue
        nodes, last = [n], n
        while len(last.users) == 1:
            (u,) = last.users
            if u not in inside or not _is_activation(gm, u):
                break
            nodes.append(u)
            last = u
        units.append(_make_unit(gm, nodes, n.args[0], last, "layer", name=str(n.target)))
    return units


def _is_constant_input(n: fx.Node) -> bool:
    """An input the model was traced without (an optional argument left at its default, e.g. a
    ViT's attn_mask=None): its default is a constant for every unit, not a value that flows."""
    return n.op == "placeholder" and n.meta.get("tensor") is False and n.meta.get("default_used", False)


def _is_batch_size(n: fx.Node) -> bool:
    """x.size(0): every activation of the chain shares the batch dimension."""
    if n.op != "call_method" or n.target != "size":
        return False
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    return dim == 0


def _is_activation(gm, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _ACTIVATION_MODULES)
    if n.op in ("call_function", "call_method"):
        name = getattr(n.target, "__name__", str(n.target))
        return name in _ACTIVATION_NAMES
    return False


def subgraph(gm: fx.GraphModule, nodes: list, inp: fx.Node, outputs: list) -> fx.GraphModule:
    """A GraphModule computing `outputs` from `inp` with `nodes`; it shares gm's modules
    (and so their parameters)."""
    g = fx.Graph()
    env = {inp: g.placeholder("x")}

    def lookup(a):
        if a not in env:
            if a.op == "get_attr":
                env[a] = g.node_copy(a, lookup)
            elif _is_constant_input(a):
                env[a] = a.args[0] if a.args else None
            elif _is_batch_size(a):
                env[a] = g.call_method("size", (env[inp], 0))
            else:
                raise PartitionError(f"node {a.name} is needed but is outside the unit")
        return env[a]

    for n in nodes:
        if n is inp:
            continue
        env[n] = g.node_copy(n, lookup)
        if all(o in env for o in outputs):
            break
    g.output(lookup(outputs[0]) if len(outputs) == 1 else tuple(lookup(o) for o in outputs))
    sub = fx.GraphModule(gm, g)
    sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub
