"""``fastres.fold_bn``: an inference-only copy with every BatchNorm folded into its preceding conv.

A BN in eval mode is the per-channel affine map y = (x − mean)·w/√(var + eps) + b, so after a conv it
folds into the conv's weight (scaled per output channel) and bias. The BN is then replaced by
``nn.Identity`` — or, for a BatchNormAct2d, by ``ResidualAct`` (the residual add and the ReLU remain).

Conv → BN pairs are found where the data flow is known: consecutive children of an ``nn.Sequential``,
and conv{i} → bn{i} in fastres / torchvision / timm ResNet blocks and ResNet stems.
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from fastres.nn.batch_norm_act import BatchNormAct2d, ResidualAct
from fastres.nn.resnet_blocks import BasicBlock, Bottleneck, TimmBasicBlock, TimmBottleneck

__all__ = ["fold_bn"]

_FOLDABLE_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _known_pairs():
    """(class, [(conv name, bn name), ...]) for modules whose forward feeds conv{i} into bn{i}."""
    pairs = [(BasicBlock, 2), (Bottleneck, 3), (TimmBasicBlock, 2), (TimmBottleneck, 3)]
    from fastres import models

    classes = [(cls, [(f"conv{i}", f"bn{i}") for i in range(1, n + 1)]) for cls, n in pairs]
    classes.append((models.ResNet, [("conv1", "bn1")]))
    for module_name, names in (("torchvision.models.resnet", ("BasicBlock", "Bottleneck", "ResNet")),
                               ("timm.models.resnet", ("BasicBlock", "Bottleneck", "ResNet"))):
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for cls_name, n in zip(names, (2, 3, 1)):
            classes.append((getattr(module, cls_name),
                            [(f"conv{i}", f"bn{i}") for i in range(1, n + 1)]))
    return classes


def _fold_into(conv: nn.Conv2d, bn) -> bool:
    if type(conv) is not nn.Conv2d or not isinstance(bn, _FOLDABLE_BN):
        return False
    if bn.running_mean is None or bn.running_var is None or conv.out_channels != bn.num_features:
        return False  # without running statistics eval-mode BN normalises with batch statistics
    with torch.no_grad():
        invstd = torch.rsqrt(bn.running_var.double() + bn.eps)
        scale = invstd if bn.weight is None else bn.weight.double() * invstd
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        if conv.bias is not None:
            shift = shift + conv.bias.double() * scale
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
    return True


def _replacement(bn) -> nn.Module:
    if isinstance(bn, BatchNormAct2d):
        return ResidualAct(bn.activation)
    return nn.Identity()


def _fold_children(module: nn.Module, known) -> int:
    folded = 0
    children = module._modules
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        keys = list(children)
        for conv_name, bn_name in zip(keys, keys[1:]):
            if _fold_into(children[conv_name], children[bn_name]):
                children[bn_name] = _replacement(children[bn_name])
                folded += 1
        return folded
    for cls, pairs in known:
        if type(module) is cls:
            for conv_name, bn_name in pairs:
                conv, bn = children.get(conv_name), children.get(bn_name)
                if conv is not None and bn is not None and _fold_into(conv, bn):
                    children[bn_name] = _replacement(bn)
                    folded += 1
            break
    return folded


def fold_bn(model: nn.Module) -> nn.Module:
    """An eval-mode, inference-only deep copy of ``model`` (parameters do not require grad) in
    which each BatchNorm that directly follows a conv is folded into that conv's weight and bias.
    ``model`` is not modified. BNs whose producer is not a known conv stay as they are."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn expects an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    known = _known_pairs()
    for module in list(model.modules()):
        _fold_children(module, known)
    model.requires_grad_(False)
    return model
