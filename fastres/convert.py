"""``fastres.convert``: swap a torchvision / timm ResNet's BN → ReLU and BN → add → ReLU for fused
modules that share the original parameter and buffer tensors (state_dict identical key for key).

Patterns (each checked by exact class and by the forward that will run, so nothing is converted on
a guess; torchvision and timm are never imported here, only looked up if already loaded):

* torchvision ``BasicBlock`` / ``Bottleneck`` -> ``fastres.BasicBlock`` / ``fastres.Bottleneck``
* timm ``BasicBlock`` / ``Bottleneck`` (ResNet family) -> ``fastres.nn.TimmBasicBlock`` /
  ``TimmBottleneck``, fusing each BN whose ReLU follows it directly (drop_block, se and drop_path
  break the pattern there)
* the stem of torchvision's / timm's ``ResNet`` (``bn1`` then ``relu`` / ``act1``) and any
  ``nn.Sequential`` holding ``BatchNorm2d`` then ``ReLU`` (timm's deep stem,
  ``Conv2dNormActivation``):
  the BN becomes ``BatchNormAct2d(activation="relu")`` and the ReLU ``nn.Identity``
* the ``BatchNorm2d`` ending a converted block's downsample ``nn.Sequential`` ->
  ``BatchNormAct2d(activation=None)``; the block's last BN then keeps its output, not the
  downsample's, for backward's ReLU mask (``BatchNormAct2d.mask_from_output``)
* the stem's ``nn.MaxPool2d`` of torchvision's / timm's ``ResNet`` -> ``fastres.nn.MaxPool2d``
  (recomputes its argmax in backward instead of keeping int64 indices)

Modules with hooks, BN subclasses (SyncBatchNorm, ...) and other activations are left as they are.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from typing import Optional

from torch import nn

from fastres.nn.batch_norm_act import BatchNormAct2d, check_process_group
from fastres.nn.pool import MaxPool2d
from fastres.nn.resnet_blocks import (BasicBlock, Bottleneck, TimmBasicBlock, TimmBottleneck,
                                      adopt, free_downsample_residual)

__all__ = ["convert", "ConversionReport"]

log = logging.getLogger("fastres")


@dataclasses.dataclass
class ConversionReport:
    """What ``convert`` did: ``converted`` and ``left`` list (name, class name, detail)."""

    converted: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastres.convert: {len(self.converted)} converted, {len(self.left)} left"]
        lines += [f"  converted {name or '<root>'} ({cls}): {what}"
                  for name, cls, what in self.converted]
        lines += [f"  left      {name or '<root>'} ({cls}): {why}" for name, cls, why in self.left]
        return "\n".join(lines)


def _class(module_name: str, class_name: str):
    """A class of a library that is already imported (only then can the model hold one)."""
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _bn_problem(bn) -> Optional[str]:
    """Why ``bn`` cannot become a BatchNormAct2d (None when it can)."""
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d"
    if _has_hooks(bn):
        return "the BatchNorm2d has hooks"
    return None


def _relu_problem(act) -> Optional[str]:
    if type(act) is not nn.ReLU:
        return f"the activation is {type(act).__name__}, not nn.ReLU"
    if _has_hooks(act):
        return "the ReLU has hooks"
    return None


def _same_forward(module, cls, *methods) -> bool:
    return all(getattr(type(module), m, None) is getattr(cls, m) for m in methods)


class _Converter:
    def __init__(self):
        self.report = ConversionReport()
        self.why_left: dict[int, str] = {}  # id(BatchNorm2d) -> why it stayed unfused
        self.tv_basic = _class("torchvision.models.resnet", "BasicBlock")
        self.tv_bottleneck = _class("torchvision.models.resnet", "Bottleneck")
        self.tv_resnet = _class("torchvision.models.resnet", "ResNet")
        self.timm_basic = _class("timm.models.resnet", "BasicBlock")
        self.timm_bottleneck = _class("timm.models.resnet", "Bottleneck")
        self.timm_resnet = _class("timm.models.resnet", "ResNet")

    # -- helpers -----------------------------------------------------------------------------------

    def fuse_bn(self, bn, activation, name, residual=False):
        new = BatchNormAct2d.from_batch_norm(bn, activation)
        self.report.converted.append(
            (name, type(bn).__name__, f"BatchNormAct2d(activation={activation!r})"
             + (" with the residual add" if residual else "")))
        return new

    def convert_downsample(self, downsample, name):
        """The BN ending a downsample nn.Sequential runs the fused op too (no activation)."""
        if (type(downsample) is nn.Sequential and len(downsample) > 0
                and not _has_hooks(downsample)):
            last = str(len(downsample) - 1)
            bn = downsample._modules[last]
            if _bn_problem(bn) is None:
                downsample._modules[last] = self.fuse_bn(bn, None, f"{name}.{last}")

    def leave(self, name, module, why, bns=()):
        self.report.left.append((name, type(module).__name__, why))
        for bn in bns:
            self.why_left.setdefault(id(bn), f"its block was left: {why}")

    # -- block patterns ----------------------------------------------------------------------------

    def convert_block(self, module, name):
        """The converted block, or None."""
        cls = type(module)
        if cls is BasicBlock or cls is Bottleneck or cls in (TimmBasicBlock, TimmBottleneck):
            return None
        if cls in (self.tv_basic, self.tv_bottleneck) and cls is not None:
            return self.convert_torchvision_block(module, name)
        if cls in (self.timm_basic, self.timm_bottleneck) and cls is not None:
            return self.convert_timm_block(module, name)
        for lib_cls in (self.tv_basic, self.tv_bottleneck, self.timm_basic, self.timm_bottleneck):
            if lib_cls is not None and isinstance(module, lib_cls):
                self.leave(name, module, f"subclass of {lib_cls.__module__}.{lib_cls.__name__}: "
                                         "its forward may differ")
                return None
        return None

    def convert_torchvision_block(self, block, name):
        bottleneck = type(block) is self.tv_bottleneck
        bn_names = ("bn1", "bn2", "bn3") if bottleneck else ("bn1", "bn2")
        bns = [getattr(block, n) for n in bn_names]
        problem = None
        if _has_hooks(block):
            problem = "the block has hooks"
        elif _relu_problem(block.relu):
            problem = _relu_problem(block.relu)
        elif all(_bn_problem(bn) for bn in bns):
            problem = _bn_problem(bns[0])
        if problem:
            self.leave(name, block, problem, bns)
            return None
        replace = {}
        for n, bn in zip(bn_names, bns):
            if _bn_problem(bn) is None:  # the rest run eagerly inside the fastres block
                replace[n] = self.fuse_bn(bn, "relu", f"{name}.{n}", residual=n == bn_names[-1])
            else:
                self.why_left[id(bn)] = _bn_problem(bn)
        new = adopt(Bottleneck if bottleneck else BasicBlock, block, replace)
        if new.downsample is not None:
            self.convert_downsample(new.downsample, f"{name}.downsample")
        free_downsample_residual(new)
        self.report.converted.append((name, type(block).__name__, type(new).__name__))
        return new

    def convert_timm_block(self, block, name):
        bottleneck = type(block) is self.timm_bottleneck
        if _has_hooks(block):
            self.leave(name, block, "the block has hooks", [block.bn1, block.bn2])
            return None
        if bottleneck:
            # (flag, bn, act, extra condition between them)
            stages = [("fused_head", "bn1", "act1", None),
                      ("fused_mid", "bn2", "act2", self._drop_block_problem(block)),
                      ("fused_tail", "bn3", "act3", self._tail_problem(block))]
        else:
            stages = [("fused_head", "bn1", "act1", self._drop_block_problem(block)),
                      ("fused_tail", "bn2", "act2", self._tail_problem(block))]
        replace, flags, problems = {}, {}, []
        for flag, bn_name, act_name, extra in stages:
            bn = getattr(block, bn_name)
            problem = _bn_problem(bn) or _relu_problem(getattr(block, act_name)) or extra
            if problem:
                problems.append(f"{bn_name}: {problem}")
                self.why_left[id(bn)] = problem
                continue
            flags[flag] = True
            replace[bn_name] = self.fuse_bn(bn, "relu", f"{name}.{bn_name}",
                                            residual=flag == "fused_tail")
        if not flags:
            self.leave(name, block, "; ".join(problems))
            return None
        new = adopt(TimmBottleneck if bottleneck else TimmBasicBlock, block, replace)
        new.__dict__.update(flags)
        if new.downsample is not None:
            self.convert_downsample(new.downsample, f"{name}.downsample")
        if flags.get("fused_tail"):
            free_downsample_residual(new)
        detail = type(new).__name__
        if problems:
            detail += f" (left unfused: {'; '.join(problems)})"
        self.report.converted.append((name, type(block).__name__, detail))
        return new

    @staticmethod
    def _drop_block_problem(block):
        if type(block.drop_block) is not nn.Identity:
            return f"drop_block ({type(block.drop_block).__name__}) sits between BN and ReLU"
        return None

    @staticmethod
    def _tail_problem(block):
        if block.se is not None:
            return f"attention ({type(block.se).__name__}) sits between BN and the residual add"
        if block.drop_path is not None:
            return (f"drop_path ({type(block.drop_path).__name__}) sits between BN and the "
                    "residual add")
        return None

    # -- parent patterns: a BN child followed by a ReLU child -------------------------------------

    def fuse_pair(self, parent, bn_name, act_name, name):
        bn, act = parent._modules.get(bn_name), parent._modules.get(act_name)
        if not isinstance(bn, nn.BatchNorm2d) or isinstance(bn, BatchNormAct2d):
            return
        problem = _bn_problem(bn) or _relu_problem(act)
        if problem:
            if not _bn_problem(bn) and not isinstance(act, nn.ReLU) and (
                    type(act).__module__ != "torch.nn.modules.activation"):
                problem = f"no ReLU follows it (next: {type(act).__name__})"
            self.why_left[id(bn)] = problem
            return
        prefix = f"{name}." if name else ""
        parent._modules[bn_name] = self.fuse_bn(bn, "relu", prefix + bn_name)
        parent._modules[act_name] = nn.Identity()

    def convert_pairs(self, module, name):
        if _has_hooks(module):
            return
        cls = type(module)
        if isinstance(module, nn.Sequential) and _same_forward(module, nn.Sequential, "forward"):
            keys = list(module._modules)
            for bn_name, act_name in zip(keys, keys[1:]):
                self.fuse_pair(module, bn_name, act_name, name)
        elif self.tv_resnet is not None and cls is self.tv_resnet:
            self.fuse_pair(module, "bn1", "relu", name)
            self.convert_max_pool(module, "maxpool", name)
        elif (self.timm_resnet is not None and cls is self.timm_resnet
              and _same_forward(module, self.timm_resnet, "forward_features",
                                "forward_intermediates")):
            self.fuse_pair(module, "bn1", "act1", name)
            self.convert_max_pool(module, "maxpool", name)

    def convert_max_pool(self, parent, pool_name, name):
        """The stem's max-pool recomputes its argmax in backward instead of keeping int64
        indices (fastres.nn.MaxPool2d: same results, no state)."""
        pool = parent._modules.get(pool_name)
        if type(pool) is nn.MaxPool2d and not _has_hooks(pool) and not pool.return_indices:
            parent._modules[pool_name] = MaxPool2d.from_max_pool(pool)
            prefix = f"{name}." if name else ""
            self.report.converted.append((prefix + pool_name, "MaxPool2d",
                                          "fastres.nn.MaxPool2d (no indices kept for backward)"))

    # -- walk -------------------------------------------------------------------------------------

    def visit(self, module, name):
        new = self.convert_block(module, name)
        if new is not None:
            module = new
        for child_name, child in list(module._modules.items()):
            if child is not None:
                module._modules[child_name] = self.visit(
                    child, f"{name}.{child_name}" if name else child_name)
        self.convert_pairs(module, name)
        return module

    def synchronise(self, module, name, group):
        """sync_bn: every BatchNormAct2d gets ``group``; every plain BatchNorm2d left unfused becomes
        a BatchNormAct2d(activation=None) with it, so that no BN of the model stays local."""
        for child_name, child in list(module._modules.items()):
            qualified = f"{name}.{child_name}" if name else child_name
            if isinstance(child, BatchNormAct2d):
                child.process_group = group
            elif isinstance(child, nn.BatchNorm2d) and _bn_problem(child) is None:
                new = self.fuse_bn(child, None, qualified)
                new.process_group = group
                module._modules[child_name] = new
            elif child is not None:
                self.synchronise(child, qualified, group)

    def finish(self, model):
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) \
                    and not isinstance(module, BatchNormAct2d):
                why = self.why_left.get(
                    id(module), "no ReLU follows it in a pattern fastres recognises")
                self.report.left.append((name, type(module).__name__, why))


def convert(model: nn.Module, inplace: bool = False, return_report: bool = False,
            sync_bn: bool = False, process_group=None):
    """Return ``model`` with torchvision / timm ResNet blocks and BN → ReLU pairs swapped for fused
    fastres modules sharing the same parameters and buffers (state_dict unchanged, key for key).

    sync_bn=True synchronises the training-mode statistics of every BatchNormAct2d over
    ``process_group`` (default ``"world"``: the default group at call time), as
    ``nn.SyncBatchNorm.convert_sync_batchnorm``; plain BatchNorm2d that no fused pattern took become
    ``BatchNormAct2d(activation=None)`` so they are synchronised too (BNs with hooks and BN
    subclasses are left, and reported).

    inplace=False converts a deep copy and leaves ``model`` untouched. With ``return_report=True``
    returns ``(model, ConversionReport)``. What was converted and left is logged to the "fastres"
    logger (INFO summary, DEBUG details).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if process_group is not None and not sync_bn:
        raise ValueError("process_group is only used with sync_bn=True")
    group = check_process_group("world" if process_group is None else process_group)
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter()
    model = converter.visit(model, "")
    if sync_bn:
        if isinstance(model, nn.BatchNorm2d) and not isinstance(model, BatchNormAct2d) \
                and _bn_problem(model) is None:
            model = converter.fuse_bn(model, None, "")
        if isinstance(model, BatchNormAct2d):
            model.process_group = group
        converter.synchronise(model, "", group)
    converter.finish(model)
    report = converter.report
    log.info("fastres.convert: converted %d modules, left %d", len(report.converted),
             len(report.left))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", report)
    return (model, report) if return_report else model
