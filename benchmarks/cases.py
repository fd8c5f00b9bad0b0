"""Benchmark case definitions, shared by the runner (``benchmarks.run``) and the pytest-benchmark
entry points (``benchmarks/test_bench.py``).

The op- and block-level shapes are derived from the ResNet architecture itself (``resnet_layers``
walks the torchvision ResNet v1.5 layout: stride on the 3x3 conv of a bottleneck, a 1x1 conv + BN
downsample on the shortcut when the shape changes), not written by hand, and deduplicated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# --------------------------------------------------------------------------------------------------
# ResNet architecture walk

STAGE_WIDTHS = (64, 128, 256, 512)
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class BNSpec:
    """One BatchNorm (+ residual add) (+ activation) of the net; output is (C, H, W)."""
    channels: int
    height: int
    width: int
    residual: bool
    activation: Optional[str]  # "relu" or None


@dataclass(frozen=True)
class ConvSpec:
    """One conv (no bias) of the net, followed by its BN; input is (in_channels, height, width)."""
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    height: int
    width: int


@dataclass(frozen=True)
class BlockSpec:
    """One residual block: kind "basic" or "bottleneck", input (inplanes, height, width)."""
    kind: str
    inplanes: int
    planes: int
    stride: int
    downsample: bool
    height: int
    width: int

    @property
    def out_channels(self) -> int:
        return self.planes * EXPANSION[self.kind]


@dataclass
class Layers:
    bns: list = field(default_factory=list)
    convs: list = field(default_factory=list)
    blocks: list = field(default_factory=list)


def resnet_layers(arch: str, image_size: int = 224) -> Layers:
    """Every conv, BN and block of a torchvision ResNet, in forward order (with repeats)."""
    kind, depths = ARCHS[arch]
    exp = EXPANSION[kind]
    out = Layers()
    h = image_size
    out.convs.append(ConvSpec(3, 64, 7, 2, 3, h, h))
    h = conv_out(h, 7, 2, 3)
    out.bns.append(BNSpec(64, h, h, False, "relu"))
    h = conv_out(h, 3, 2, 1)  # max pool
    inplanes = 64
    for stage, (planes, depth) in enumerate(zip(STAGE_WIDTHS, depths)):
        for b in range(depth):
            stride = 2 if stage > 0 and b == 0 else 1
            down = b == 0 and (stride != 1 or inplanes != planes * exp)
            out.blocks.append(BlockSpec(kind, inplanes, planes, stride, down, h, h))
            h2 = conv_out(h, 3, stride, 1)
            if kind == "bottleneck":
                out.convs.append(ConvSpec(inplanes, planes, 1, 1, 0, h, h))
                out.bns.append(BNSpec(planes, h, h, False, "relu"))
                out.convs.append(ConvSpec(planes, planes, 3, stride, 1, h, h))
                out.bns.append(BNSpec(planes, h2, h2, False, "relu"))
                out.convs.append(ConvSpec(planes, planes * exp, 1, 1, 0, h2, h2))
                out.bns.append(BNSpec(planes * exp, h2, h2, True, "relu"))
            else:
                out.convs.append(ConvSpec(inplanes, planes, 3, stride, 1, h, h))
                out.bns.append(BNSpec(planes, h2, h2, False, "relu"))
                out.convs.append(ConvSpec(planes, planes, 3, 1, 1, h2, h2))
                out.bns.append(BNSpec(planes, h2, h2, True, "relu"))
            if down:  # the shortcut: 1x1 conv + BN, no activation (its output is the residual)
                out.convs.append(ConvSpec(inplanes, planes * exp, 1, stride, 0, h, h))
                out.bns.append(BNSpec(planes * exp, h2, h2, False, None))
            inplanes = planes * exp
            h = h2
    return out


def dedupe(items):
    seen, out = set(), []
    for it in items:
        if it not in seen:
            seen.add(it)
            out.append(it)
    return out


# --------------------------------------------------------------------------------------------------
# Cases: a spec plus a batch size. ``name`` is the row label in the results.


@dataclass(frozen=True)
class OpCase:
    level = "op"
    batch: int
    spec: BNSpec

    @property
    def shape(self):
        return (self.batch, self.spec.channels, self.spec.height, self.spec.width)

    @property
    def name(self) -> str:
        s = self.spec
        op = "bn" + ("+add" if s.residual else "") + ("+relu" if s.activation else "")
        return f"{op} {'x'.join(map(str, self.shape))}"


@dataclass(frozen=True)
class ConvCase:
    level = "block"
    batch: int
    spec: ConvSpec

    @property
    def name(self) -> str:
        s = self.spec
        return (f"ConvBNAct2d k{s.kernel}s{s.stride} {s.in_channels}->{s.out_channels} "
                f"@{self.batch}x{s.height}x{s.width}")


@dataclass(frozen=True)
class BlockCase:
    level = "block"
    batch: int
    spec: BlockSpec

    @property
    def name(self) -> str:
        s = self.spec
        cls = "BasicBlock" if s.kind == "basic" else "Bottleneck"
        return (f"{cls} {s.inplanes}->{s.out_channels} s{s.stride}{' ds' if s.downsample else ''} "
                f"@{self.batch}x{s.height}x{s.width}")


@dataclass(frozen=True)
class ModelCase:
    level = "model"
    arch: str
    batch: int
    image_size: int

    @property
    def name(self) -> str:
        return f"{self.arch} {self.batch}x3x{self.image_size}x{self.image_size}"


def op_cases(batch: int, image_size: int = 224, arch: str = "resnet50") -> list[OpCase]:
    """Every distinct BN(+add)(+act) of the net: shape, residual and activation as in the net."""
    return [OpCase(batch, s) for s in dedupe(resnet_layers(arch, image_size).bns)]


def conv_cases(batch: int, image_size: int = 224, arch: str = "resnet50",
               one_per_stage: bool = False) -> list[ConvCase]:
    specs = dedupe(resnet_layers(arch, image_size).convs)
    if one_per_stage:  # the stride-1 3x3 conv of each stage
        specs = [s for s in specs if s.kernel == 3 and s.stride == 1]
    return [ConvCase(batch, s) for s in specs]


def block_cases(batch: int, image_size: int = 224, arch: str = "resnet50",
                one_per_stage: bool = False) -> list[BlockCase]:
    specs = dedupe(resnet_layers(arch, image_size).blocks)
    if one_per_stage:  # the identity (non-downsampling) block of each stage
        specs = [s for s in specs if not s.downsample]
    return [BlockCase(batch, s) for s in specs]


@dataclass
class Suite:
    """Which cases and dtypes to run, per level."""
    ops: list
    blocks: list
    models: list
    dtypes: dict  # level -> tuple of dtype names

    def units(self, order=("op", "block", "model")):
        """(case, dtype) work units, level by level in ``order``; within a level, dtype-major."""
        by_level = {"op": self.ops, "block": self.blocks, "model": self.models}
        out = []
        for item in order:
            level, _, only_dtype = item.partition(":")
            for dtype in self.dtypes.get(level, ()):
                if only_dtype and dtype != only_dtype:
                    continue
                out.extend((case, dtype) for case in by_level[level])
        return out


GPU_DTYPES = ("bfloat16", "float16")


def full_suite() -> Suite:
    """The published GPU figures: batch 256 at 224x224 everywhere."""
    return Suite(
        ops=op_cases(256),
        blocks=conv_cases(256) + block_cases(256, arch="resnet18") + block_cases(256),
        models=[ModelCase("resnet50", 256, 224), ModelCase("resnet18", 256, 224)],
        dtypes={"op": GPU_DTYPES, "block": GPU_DTYPES, "model": GPU_DTYPES},
    )


def quick_suite() -> Suite:
    """--quick on a GPU: batch 64, one block of each kind per stage, bf16 for blocks and models."""
    return Suite(
        ops=op_cases(64),
        blocks=(conv_cases(64, one_per_stage=True) + block_cases(64, arch="resnet18", one_per_stage=True)
                + block_cases(64, one_per_stage=True)),
        models=[ModelCase("resnet50", 64, 224), ModelCase("resnet18", 64, 224)],
        dtypes={"op": GPU_DTYPES, "block": ("bfloat16",), "model": ("bfloat16",)},
    )


# --quick runs the most-looked-at figures first, so a time budget cuts the least important.
QUICK_ORDER = ("model:bfloat16", "op:bfloat16", "block:bfloat16", "op:float16")
FULL_ORDER = ("op", "block", "model")


def cpu_suite(dtype: str = "float32") -> Suite:
    """Without a GPU (``make bench``): op and block cases at small sizes (batch 2, 64x64 images)."""
    return Suite(
        ops=op_cases(2, image_size=64),
        blocks=(conv_cases(2, 64, one_per_stage=True) + block_cases(2, 64, "resnet18", True)
                + block_cases(2, 64, one_per_stage=True)),
        models=[],
        dtypes={"op": (dtype,), "block": (dtype,)},
    )


def tiny_suite(dtype: str = "float32") -> Suite:
    """A smoke test of every code path in seconds (``--tiny``; used by gpu_check.sh --dry-run)."""
    ops = op_cases(2, image_size=32)
    return Suite(
        ops=[c for c in ops if c.spec.residual][:1] + [c for c in ops if not c.spec.residual][:1],
        blocks=conv_cases(2, 32, one_per_stage=True)[:1] + block_cases(2, 32, "resnet18", True)[:1],
        models=[ModelCase("resnet18", 2, 32)],
        dtypes={"op": (dtype,), "block": (dtype,), "model": (dtype,)},
    )
