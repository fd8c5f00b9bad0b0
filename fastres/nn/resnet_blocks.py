"""ResNet blocks whose BN → ReLU and BN → add → ReLU run as one fused op each.

``BasicBlock`` and ``Bottleneck`` follow torchvision's constructor, ``expansion`` and attribute
names, so their state_dicts are torchvision's key for key. ``TimmBasicBlock`` and ``TimmBottleneck``
are what ``fastres.convert`` turns timm's ResNet blocks into: the same children (same keys), a fused
forward.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from fastres.nn.batch_norm_act import BatchNormAct2d, ResidualAct
from fastres.nn.normconv import maybe_normconv

__all__ = ["BasicBlock", "Bottleneck", "TimmBasicBlock", "TimmBottleneck", "conv3x3", "conv1x1",
           "free_downsample_residual"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def is_fused_relu(norm: nn.Module) -> bool:
    return isinstance(norm, BatchNormAct2d) and norm.activation == "relu"


def norm_relu(norm: nn.Module, relu: nn.Module, x: Tensor, residual: Optional[Tensor] = None):
    """``relu(norm(x) [+ residual])``: one fused op when ``norm`` is a BatchNormAct2d (or the
    ResidualAct left of one by ``fold_bn``)."""
    if isinstance(norm, (BatchNormAct2d, ResidualAct)):
        out = norm(x, residual)
        return out if norm.activation == "relu" else relu(out)
    out = norm(x)
    if residual is not None:
        out += residual
    return relu(out)


def adopt(cls, src: nn.Module, replace: dict):
    """An instance of ``cls`` holding ``src``'s children (those in ``replace`` swapped), parameters,
    buffers and plain attributes: same objects, same state_dict keys in the same order."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in vars(src).items():
        if not key.startswith("_"):
            new.__dict__[key] = value
    new._parameters = dict(src._parameters)
    new._buffers = dict(src._buffers)
    new._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    new._modules = {name: replace.get(name, module) for name, module in src._modules.items()}
    return new


def free_downsample_residual(block: nn.Module) -> None:
    """A block whose residual is its downsample's output (a tensor nothing else keeps for
    backward) has its last fused BN keep the block output instead for the ReLU mask
    (``BatchNormAct2d.mask_from_output``): the output is kept anyway as the next conv's input, so
    the block saves one output-sized tensor less. Same results."""
    last = getattr(block, "bn3", None) if hasattr(block, "conv3") else getattr(block, "bn2", None)
    if getattr(block, "downsample", None) is not None and is_fused_relu(last):
        last.mask_from_output = True


def _default_norm(norm_layer):
    return BatchNormAct2d if norm_layer is None else norm_layer


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3 → BN+ReLU → conv3x3 → BN+add+ReLU (fused)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = _default_norm(norm_layer)
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)  # used only when a norm layer is not a fused one
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        free_downsample_residual(self)

    def forward(self, x: Tensor) -> Tensor:
        fused = maybe_normconv(self, x)  # the normconv path, where selected (fastres.nn.normconv)
        if fused is not None:
            return fused
        identity = x if self.downsample is None else self.downsample(x)
        out = norm_relu(self.bn1, self.relu, self.conv1(x))
        return norm_relu(self.bn2, self.relu, self.conv2(out), identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5, stride on the 3×3): conv1x1 → BN+ReLU → conv3x3 →
    BN+ReLU → conv1x1 → BN+add+ReLU (fused)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = _default_norm(norm_layer)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # used only when a norm layer is not a fused one
        self.downsample = downsample
        self.stride = stride
        free_downsample_residual(self)

    def forward(self, x: Tensor) -> Tensor:
        fused = maybe_normconv(self, x)  # the normconv path, where selected (fastres.nn.normconv)
        if fused is not None:
            return fused
        identity = x if self.downsample is None else self.downsample(x)
        out = norm_relu(self.bn1, self.relu, self.conv1(x))
        out = norm_relu(self.bn2, self.relu, self.conv2(out))
        return norm_relu(self.bn3, self.relu, self.conv3(out), identity)


# --------------------------------------------------------------------------------------------------
# timm's ResNet blocks, converted. Built only by ``fastres.convert`` (which checks the pattern):
# each BN that is directly followed by its ReLU holds it fused (``fused_*`` flags); the rest runs
# exactly as timm's forward does.


class TimmBasicBlock(nn.Module):
    expansion: int = 1
    fused_head: bool = False  # bn1 → act1 fused (drop_block is Identity)
    fused_tail: bool = False  # bn2 → + shortcut → act2 fused (no se, no drop_path)

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.bn1(self.conv1(x))
        if not self.fused_head:
            x = self.act1(self.drop_block(x))
        x = self.aa(x)
        x = self.conv2(x)
        if self.fused_tail:
            if self.downsample is not None:
                shortcut = self.downsample(shortcut)
            return self.bn2(x, shortcut)
        x = self.bn2(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class TimmBottleneck(nn.Module):
    expansion: int = 4
    fused_head: bool = False  # bn1 → act1 fused
    fused_mid: bool = False   # bn2 → act2 fused (drop_block is Identity)
    fused_tail: bool = False  # bn3 → + shortcut → act3 fused (no se, no drop_path)

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.bn1(self.conv1(x))
        if not self.fused_head:
            x = self.act1(x)
        x = self.bn2(self.conv2(x))
        if not self.fused_mid:
            x = self.act2(self.drop_block(x))
        x = self.aa(x)
        x = self.conv3(x)
        if self.fused_tail:
            if self.downsample is not None:
                shortcut = self.downsample(shortcut)
            return self.bn3(x, shortcut)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)
