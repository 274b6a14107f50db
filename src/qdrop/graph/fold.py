"""Fold BatchNorm into the convolution (or linear layer) that feeds it."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

_FOLDABLE = {
    nn.BatchNorm1d: (nn.Conv1d, nn.Linear),
    nn.BatchNorm2d: (nn.Conv2d,),
    nn.BatchNorm3d: (nn.Conv3d,),
}


def fold_bn_weights(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of `layer` computing bn(layer(x)) with BN in eval mode."""
    fused = copy.deepcopy(layer)
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
        beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
        factor = gamma * inv_std  # one per output channel
        w = layer.weight * factor.reshape([-1] + [1] * (layer.weight.dim() - 1))
        b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        b = (b - bn.running_mean) * factor + beta
        fused.weight = nn.Parameter(w)
        fused.bias = nn.Parameter(b)
        # What the FP network was trained to see at the BN, kept for PD-Quant's distribution correction
        # (qdrop.recon.engine._correct_distribution): the BN normalised its input to (running_mean,
        # sqrt(running_var + eps)) per channel and mapped that to (beta, |gamma|) at this layer's output.
        # A plain attribute: not a buffer, so neither state dicts nor exports see it.
        fused.bn_output = (beta.detach().clone(), gamma.detach().abs().clone(), (bn.running_var + bn.eps).sqrt().clone())
    return fused


def _set_module(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold every eval-mode BN whose input is a conv/linear used only by that BN.

    Returns the folded BN names. A layer module called more than once is left alone
    (folding would change its other calls).
    """
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    folded = []
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or type(modules.get(n.target)) not in _FOLDABLE:
            continue
        bn = modules[n.target]
        src = n.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = modules.get(src.target)
        if not isinstance(layer, _FOLDABLE[type(bn)]) or calls[src.target] != 1 or bn.training:
            continue
        if calls[n.target] != 1 or not bn.track_running_stats:
            continue
        _set_module(gm, src.target, fold_bn_weights(layer, bn))
        n.replace_all_uses_with(src)
        gm.graph.erase_node(n)
        folded.append(n.target)
    for name in folded:
        parent, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(parent) if parent else gm, attr)
    gm.graph.lint()
    gm.recompile()
    return folded
