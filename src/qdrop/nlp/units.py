"""Reconstruction units of a transformer by module scope: one unit per repeated block.

The blocks are found structurally: the ModuleList (or Sequential) of two or more children of
one class, each holding quantized layers, that covers the most quantized layers (an encoder's
layers, a decoder's layers, a ViT's blocks). No model or class name appears here; `units=`
names the container when the structure is unusual (`units="model.layers"`).

A block's inputs are whatever its forward receives. They are captured with forward pre-hooks
on the FP model (quantizers off), one group per calibration batch: the hidden states entering
the first block, and for every block the other positional and keyword arguments (attention
mask, rotary position embeddings, position ids, ...). The engine in qdrop.recon carries the
hidden states along the chain as it carries a CNN's tensors and passes each block its own
arguments; the token mask of the batch (its attention_mask) keeps padding out of the error.

Finer units (split=True): each block becomes one unit per part - the block's children that hold
quantized layers, in the order the forward calls them (an attention, an MLP). A child holding a
single quantized layer joins the part that follows it (a trailing one, the part before): one Linear
is a layer, not a sub-block, so BERT's `intermediate` and `output` form its MLP part. A part's
input is still the block's input (hidden states and arguments) and its output the output of its
last child, taken by a forward hook that stops the block there: the residuals, norms and masks
between the parts stay the block's own code, and nothing model-specific is written here. The
parts before it run quantized, as already reconstructed (their cost is recomputed every
iteration; it buys this generality). After the block's last part the chain moves on to the block's
output (carry_fn). Where one child holds every quantized layer, its children are the parts.

This module provides the partition interface qdrop.recon.engine.reconstruct expects (see
GraphPartition there): blocks, feature_dim, start, extras, block_fn, carry_fn, layer_units,
layer_fn, layer_io. Layers outside the blocks (an LM head, a pooler) keep their calibrated ranges
and nearest rounding.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import DataError, PartitionError, UsageError
from ..graph.units import Unit
from ..quant.layers import QuantLayer
from ..quant.quantizer import Quantizer


class _Stop(Exception):
    """Raised by the last block's pre-hook: capturing needs nothing after it (no LM head)."""


def find_blocks(model: nn.Module, units: str | None = None, layer: type = QuantLayer) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the repeated blocks, in order. layer: what a block must hold, the quantized
    layers; nn.Linear finds the same blocks in the FP model, so that a run can refuse a model (or a units=)
    before it spends minutes evaluating and transforming it."""
    if units is not None:
        try:
            container = model.get_submodule(units)
        except AttributeError:
            raise PartitionError(f"units={units!r}: {type(model).__name__} has no module {units!r}") from None
        kids = list(container.named_children())
        if not kids or not any(isinstance(m, layer) for _, c in kids for m in c.modules()):
            raise PartitionError(f"units={units!r} has no children holding quantized layers; name the container of "
                                 "the model's repeated blocks")
        return [(f"{units}.{n}", c) for n, c in kids]
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.named_children())
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1:
            continue
        counts = [sum(isinstance(x, layer) for x in c.modules()) for _, c in kids]
        if min(counts) == 0:
            continue
        if best is None or sum(counts) > best[0]:  # ties: the outermost (named_modules is pre-order)
            best = (sum(counts), name, kids)
    if best is None:
        raise PartitionError(f"{type(model).__name__} has no list of repeated blocks holding quantized layers; "
                             "name the container of its blocks with units='path.to.blocks'")
    _, name, kids = best
    return [(f"{name}.{n}" if name else n, c) for n, c in kids]


def _block_unit(name: str, block: nn.Module) -> Unit:
    layers = [_join(name, n) for n, m in block.named_modules() if isinstance(m, QuantLayer)]
    acts = [_join(name, n) for n, m in block.named_modules() if isinstance(m, Quantizer) and m.role == "act"]
    return Unit(name, "block", [], None, None, layers, acts)


def _n_layers(m: nn.Module) -> int:
    return sum(isinstance(x, QuantLayer) for x in m.modules())


def _split_parent(name: str, block: nn.Module) -> tuple[str, nn.Module]:
    """The module whose children are a block's parts: the block, or below it while one child holds
    every quantized layer."""
    while True:
        holding = [(n, c) for n, c in block.named_children() if _n_layers(c)]
        if len(holding) != 1 or isinstance(holding[0][1], QuantLayer):
            return name, block
        name, block = f"{name}.{holding[0][0]}", holding[0][1]


def _parts(called: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """Children holding quantized layers, in call order, grouped into parts: consecutive children up to
    two quantized layers or more (a single-layer child joins the next; a trailing one the part before)."""
    parts, pending = [], []
    for name, child in called:
        pending.append((name, child))
        if sum(_n_layers(c) for _, c in pending) > 1:
            parts.append(pending)
            pending = []
    if pending:
        if parts:
            parts[-1].extend(pending)
        else:
            parts.append(pending)
    return parts


class ScopePartition:
    """Units of a module-swapped transformer (qdrop.nlp.prepare_transformer): one per block, or with
    split=True one per part of a block (its attention, its MLP; see the module's docstring)."""

    feature_dim = -1  # hidden states [batch, tokens, features]: the error sums features, averages real tokens

    def __init__(self, model: nn.Module, units: str | None = None, split: bool = False):
        self.model = model
        found = find_blocks(model, units)
        self.modules = [m for _, m in found]  # the blocks' modules, one per block
        self.block_names = [n for n, _ in found]
        self.split = split
        self.blocks = [_block_unit(n, m) for n, m in found]  # the units: blocks, or parts once start() has run
        self._of_block = list(range(len(found)))  # the block of each unit
        self._ends: list = [None] * len(found)  # split: the module whose output is the unit's output
        self._extras: list[list] = []
        self._x_key: list = []
        self._runs: dict = {}  # block -> its function (_whole_block)

    # ---- capture -------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, batches, device):
        """Run the model (the caller has switched quantizers off) on every calibration batch and
        capture the first block's hidden states and every block's other arguments."""
        if isinstance(batches, torch.Tensor) or not batches:
            raise UsageError("a transformer's calibration data is a non-empty list of tokenized batches "
                             "(dicts with input_ids and attention_mask)")
        batches = list(batches)
        for i, b in enumerate(batches):
            if not isinstance(b, dict) or "input_ids" not in b:
                raise DataError(f"calibration batch {i} is not a dict with input_ids (a tokenizer's output)")
        n = len(self.modules)
        self._runs = {}
        self._extras = [[] for _ in range(n)]
        self._x_key = [None] * n
        xs, masks = [], []

        def pre_hook(k):
            def hook(module, args, kwargs):
                args, kwargs = list(args), dict(kwargs)
                if args:
                    x, key = args.pop(0), None
                elif "hidden_states" in kwargs:
                    x, key = kwargs.pop("hidden_states"), "hidden_states"
                else:
                    raise PartitionError(f"block {self.blocks[k].name} was called without hidden states "
                                         f"(keyword arguments: {sorted(kwargs)})")
                self._x_key[k] = key
                self._extras[k].append(tree_map(_detach, (tuple(args), kwargs)))
                if k == 0:
                    xs.append(x.detach())
                if k == n - 1 and not self.split:
                    raise _Stop
            return hook

        def stop_after(module, args, output):  # split: the last block runs, for the call order of its parts
            raise _Stop

        # split: the children of each block's split parent, in the order the first batch calls them
        parents = [_split_parent(nm, m) for nm, m in zip(self.block_names, self.modules)] if self.split else []
        called = [[] for _ in parents]

        def child_hook(k, name, child):
            def hook(module, args, output):
                if not any(c is child for _, c in called[k]):
                    called[k].append((name, child))
            return hook

        config = getattr(self.model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        handles = [m.register_forward_pre_hook(pre_hook(k), with_kwargs=True) for k, m in enumerate(self.modules)]
        if self.split:
            handles.append(self.modules[-1].register_forward_hook(stop_after))
            handles += [c.register_forward_hook(child_hook(k, f"{pn}.{cn}", c)) for k, (pn, p) in enumerate(parents)
                        for cn, c in p.named_children() if _n_layers(c)]
        try:
            if use_cache is not None:
                config.use_cache = False  # no key/value cache objects among the captured arguments
            for b in batches:
                b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                before = len(xs)
                try:
                    self.model(**b)
                except _Stop:
                    pass
                if len(xs) != before + 1 or any(len(e) != len(xs) for e in self._extras):
                    raise PartitionError("the blocks were not each called once per batch; name the blocks with units=")
                mask = b.get("attention_mask")
                masks.append(mask.float() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)
        finally:
            for h in handles:
                h.remove()
            if use_cache is not None:
                config.use_cache = use_cache
        if self.split:
            self._make_parts(called)
        return xs, masks

    def _make_parts(self, called: list) -> None:
        units, of_block, ends = [], [], []
        for k, (name, block) in enumerate(zip(self.block_names, self.modules)):
            seen = {id(c) for _, c in called[k]}
            missed = [n for n, c in _split_parent(name, block)[1].named_children() if _n_layers(c) and id(c) not in seen]
            if missed:
                raise PartitionError(f"block {name}: {missed} hold quantized layers but were not called; "
                                     "reconstruct whole blocks (no split)")
            for part in _parts(called[k]):
                children = [_block_unit(cn, c) for cn, c in part]
                label = "+".join(cn.rsplit(".", 1)[-1] for cn, _ in part)
                units.append(Unit(f"{name}[{label}]", "block", [], None, None, [t for u in children for t in u.layers],
                                  [t for u in children for t in u.act_quants]))
                of_block.append(k)
                ends.append(part[-1][1])
        self.blocks, self._of_block, self._ends = units, of_block, ends

    def extras(self, k: int) -> list:
        return self._extras[self._of_block[k]]

    # ---- running units ---------------------------------------------------------------------
    def _whole_block(self, b: int):
        """Block b as a function of its input; one function per block, so that the engine sees that a
        whole-block unit's carry is the unit itself (and reuses its FP output)."""
        if b not in self._runs:
            module, key = self.modules[b], self._x_key[b]

            def run(x, *args, **kwargs):
                out = module(x, *args, **kwargs) if key is None else module(*args, **{key: x}, **kwargs)
                return out[0] if isinstance(out, (tuple, list)) else out
            self._runs[b] = run
        return self._runs[b]

    def block_fn(self, k: int):
        """Unit k as a function of its block's input: the block, or the block run up to the end of the part."""
        run_block, end = self._whole_block(self._of_block[k]), self._ends[k]
        if end is None:
            return run_block

        def run_part(x, *args, **kwargs):
            box = {}

            def hook(module, a, output):
                box["y"] = output
                raise _Stop
            handle = end.register_forward_hook(hook)
            try:
                run_block(x, *args, **kwargs)
            except _Stop:
                if "y" not in box:  # a hook inside the part stopped the block (layer_io): pass it on
                    raise
            finally:
                handle.remove()
            y = box["y"]
            return y[0] if isinstance(y, (tuple, list)) else y
        return run_part

    def carry_fn(self, k: int):
        """What turns unit k's input into unit k+1's: None where both read the same block input (parts
        of one block), else the whole block."""
        b = self._of_block[k]
        if k + 1 < len(self.blocks) and self._of_block[k + 1] == b:
            return None
        return self._whole_block(b)

    def layer_units(self, k: int) -> list[Unit]:
        """Each quantized layer of block k (its input quantizer inside it)."""
        out = []
        for name in self.blocks[k].layers:
            layer = self.model.get_submodule(name)
            acts = [f"{name}.{n}" for n, m in layer.named_modules() if isinstance(m, Quantizer) and m.role == "act"]
            out.append(Unit(name, "layer", [], None, None, [name], acts))
        return out

    def layer_fn(self, k: int, lu: Unit):
        return self.model.get_submodule(lu.name)

    def layer_io(self, k: int, lu: Unit, xs: list, extras: list, device, cache, with_output: bool, run_groups):
        """The layer's inputs (and outputs) while block k runs on xs: a forward hook writes them, chunk
        by chunk, into tensors allocated by cache (run_groups' allocator), and stops the block there."""
        layer = self.model.get_submodule(lu.name)
        run_block = self.block_fn(k)
        total = sum(x.numel() for x in xs)
        ins, outs = [], []
        cur = {}  # the group being run: its rows, its share of the cache, where its next rows go

        def hook(module, args, output):
            x, y = args[0].detach(), output.detach()
            if len(ins) == cur["group"]:  # the group's first chunk: the shapes are known now
                ins.append(cache.empty((cur["n"], *x.shape[1:]), cur["share"]))
                outs.append(cache.empty((cur["n"], *y.shape[1:]), cur["share"]) if with_output else None)
            i, j = cur["row"], cur["row"] + x.shape[0]
            ins[-1][i:j] = x
            if with_output:
                outs[-1][i:j] = y
            cur["row"] = j
            raise _Stop  # nothing after the layer is needed

        def until_layer(x, *args, **kwargs):
            try:
                run_block(x, *args, **kwargs)
            except _Stop:
                pass
            return x.new_empty(x.shape[0], 0)  # (no output: run_groups allocates nothing of size)

        handle = layer.register_forward_hook(hook)
        try:
            for g, (x, e) in enumerate(zip(xs, extras)):
                cur.update(group=g, n=x.shape[0], share=x.numel() / total, row=0)
                run_groups(until_layer, [x], [e], device)
        finally:
            handle.remove()
        return ins, (outs if with_output else None)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if name else prefix


def _detach(v):
    return v.detach() if isinstance(v, torch.Tensor) else v
