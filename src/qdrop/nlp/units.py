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

This module provides the partition interface qdrop.recon.engine.reconstruct expects (see
GraphPartition there): blocks, feature_dim, start, extras, block_fn, layer_units, layer_fn,
layer_io. Layers outside the blocks (an LM head, a pooler) keep their calibrated ranges and
nearest rounding.
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


def find_blocks(model: nn.Module, units: str | None = None) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the repeated blocks, in order."""
    if units is not None:
        try:
            container = model.get_submodule(units)
        except AttributeError:
            raise PartitionError(f"units={units!r}: {type(model).__name__} has no module {units!r}") from None
        kids = list(container.named_children())
        if not kids or not any(isinstance(m, QuantLayer) for _, c in kids for m in c.modules()):
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
        counts = [sum(isinstance(x, QuantLayer) for x in c.modules()) for _, c in kids]
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
    layers = [f"{name}.{n}" for n, m in block.named_modules() if isinstance(m, QuantLayer)]
    acts = [f"{name}.{n}" for n, m in block.named_modules() if isinstance(m, Quantizer) and m.role == "act"]
    return Unit(name, "block", [], None, None, layers, acts)


class ScopePartition:
    """Units of a module-swapped transformer (qdrop.nlp.prepare_transformer): one per block."""

    feature_dim = -1  # hidden states [batch, tokens, features]: the error sums features, averages real tokens

    def __init__(self, model: nn.Module, units: str | None = None):
        self.model = model
        found = find_blocks(model, units)
        self.modules = [m for _, m in found]
        self.blocks = [_block_unit(n, m) for n, m in found]
        self._extras: list[list] = []
        self._x_key: list = []

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
                if k == n - 1:
                    raise _Stop
            return hook

        config = getattr(self.model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        handles = [m.register_forward_pre_hook(pre_hook(k), with_kwargs=True) for k, m in enumerate(self.modules)]
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
        return xs, masks

    def extras(self, k: int) -> list:
        return self._extras[k]

    # ---- running units ---------------------------------------------------------------------
    def block_fn(self, k: int):
        module, key = self.modules[k], self._x_key[k]

        def run(x, *args, **kwargs):
            out = module(x, *args, **kwargs) if key is None else module(*args, **{key: x}, **kwargs)
            return out[0] if isinstance(out, (tuple, list)) else out
        return run

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


def _detach(v):
    return v.detach() if isinstance(v, torch.Tensor) else v
