"""Why residual connections cure vanishing gradients, measured on your machine.

    python -m fastres.demo.vanishing_gradients [--depth 56] [--steps 40] [--device cuda|cpu] [--out DIR]

Trains three networks of the same depth (CIFAR-ResNet layout: a stem conv, 3 stages x n units x 2 convs,
global pooling, a linear layer; depth = 6n + 2) from the same initialisation seed on the same batches:

* ``plain_sigmoid``: conv-sigmoid units without batch norm, the classic vanishing-gradient setting;
* ``plain_bn``: conv-BN-ReLU units without shortcuts;
* ``residual``: ``fastres.BasicBlock`` residual blocks (1x1-conv + BN projection shortcuts where the
  shape changes, as in torchvision's ResNet).

Every step is recorded with ``fastres.diagnostics.GradientFlow``. The run writes to ``--out``:
``loss_curves.png``; ``grad_norm_by_depth.png`` (main-path weight gradient norms by depth at the first
and last step, and the residual network's shortcut-vs-branch split); ``summary_<net>.txt``
(``GradientFlow.summary()``; ``--per-net-plots`` adds ``GradientFlow.plot()`` as ``grad_flow_<net>.png``);
``results.json`` (every measured number; non-finite ones, e.g. an infinite spread, as null); and
``verdict.txt``: sentences computed from the numbers in ``results.json``, saying what was measured.

Data: synthetic by default (10 classes of smooth random templates plus noise, fixed seed), or CIFAR-10
read from ``--cifar10 ROOT`` (torchvision's layout, never downloaded). The default size (width 8, batch
16, 16x16 images, 40 steps, one CPU thread) runs on a CPU in under two minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastres
from fastres.diagnostics import GradientFlow

NETS = ("plain_sigmoid", "plain_bn", "residual")
CHANCE_LOSS = math.log(10)


def log(msg: str) -> None:
    print(f"[vanishing_gradients] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ networks
class _LocalBasicBlock(nn.Module):
    """torchvision's BasicBlock structure; used only when fastres.BasicBlock is not available."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


_warned_fallback = False


def basic_block_class():
    """(class, description): fastres.BasicBlock when the package has it, else the local fallback."""
    block = getattr(fastres, "BasicBlock", None)
    if block is None:
        try:
            from fastres.nn import BasicBlock as block  # type: ignore[no-redef]
        except ImportError:
            block = None
    if block is None:
        global _warned_fallback
        if not _warned_fallback:
            log("fastres.BasicBlock is not available in this build: using a local torchvision-structured "
                "BasicBlock (plain torch.nn) for the residual network")
            _warned_fallback = True
        return _LocalBasicBlock, "local torchvision-structured BasicBlock (fastres.BasicBlock unavailable)"
    return block, f"{block.__module__}.{block.__qualname__}"


def _stage_plan(depth: int, width: int):
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"--depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
    units = (depth - 2) // 6
    return units, [(width, 1), (2 * width, 2), (4 * width, 2)]


def _plain_unit(cin, cout, stride, kind):
    if kind == "bn":
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=True), nn.Sigmoid()]


class PlainNet(nn.Module):
    """depth - 1 convs then a linear layer, no shortcuts: conv-BN-ReLU (kind="bn") or conv-sigmoid."""

    def __init__(self, depth: int, width: int, kind: str, num_classes: int = 10):
        super().__init__()
        units, stages = _stage_plan(depth, width)
        layers = _plain_unit(3, width, 1, kind)
        cin = width
        for cout, stride in stages:
            for u in range(units):
                layers += _plain_unit(cin, cout, stride if u == 0 else 1, kind)
                layers += _plain_unit(cout, cout, 1, kind)
                cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class ResNetCifar(nn.Module):
    """The CIFAR ResNet of depth 6n + 2 built from ``block`` (torchvision BasicBlock signature)."""

    def __init__(self, depth: int, width: int, block, num_classes: int = 10):
        super().__init__()
        units, stages = _stage_plan(depth, width)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        cin = width
        stage_modules = []
        for cout, stride in stages:
            blocks = []
            for u in range(units):
                s = stride if u == 0 else 1
                downsample = None
                if s != 1 or cin != cout:
                    downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False), nn.BatchNorm2d(cout))
                blocks.append(block(cin, cout, s, downsample))
                cin = cout
            stage_modules.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stage_modules
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def init_weights(model: nn.Module) -> None:
    """torchvision's ResNet initialisation, applied identically to every network."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) or (
                hasattr(m, "running_mean") and getattr(m, "weight", None) is not None and m.weight.dim() == 1):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build(net: str, depth: int, width: int, seed: int, block=None) -> nn.Module:
    torch.manual_seed(seed)
    if net == "plain_sigmoid":
        model = PlainNet(depth, width, "sigmoid")
    elif net == "plain_bn":
        model = PlainNet(depth, width, "bn")
    elif net == "residual":
        model = ResNetCifar(depth, width, block or basic_block_class()[0])
    else:
        raise ValueError(f"unknown network {net!r}; choose from {NETS}")
    init_weights(model)
    return model


def main_path_weights(name: str, param: torch.Tensor) -> bool:
    """The weights counted in the depth (convs and the linear layer; not the 1x1 projection shortcuts)."""
    return param.dim() >= 2 and "downsample" not in name


# -------------------------------------------------------------------------------------------- data
def synthetic_data(n: int, image_size: int, seed: int, num_classes: int = 10):
    """10 classes of smooth random 3-channel templates, each sample a template plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = templates[labels] + 0.8 * torch.randn(n, 3, image_size, image_size, generator=g)
    return images, labels


def cifar10_data(root: str, image_size: int):
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as e:
        raise ImportError("--cifar10 needs torchvision (pip install torchvision)") from e
    try:
        dataset = CIFAR10(root, train=True, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"--cifar10 {root}: no readable CIFAR-10 there (torchvision layout, "
                                f"{root}/cifar-10-batches-py; this demo never downloads): {e}") from e
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    images = (images - mean) / std
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images, torch.tensor(dataset.targets)


# ---------------------------------------------------------------------------------------- training
def train(net: str, args, images, labels, device, block):
    model = build(net, args.depth, args.width, args.seed, block).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    batches = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every network
    losses = []
    # Main-path weights by depth, plus (residual net) each block's shortcut/branch input gradients.
    flow = GradientFlow(model, optimizer=opt, parameters=main_path_weights)
    start = time.perf_counter()
    with flow:
        for _ in range(args.steps):
            index = torch.randint(0, images.shape[0], (args.batch_size,), generator=batches)
            x, y = images[index].to(device, non_blocking=True), labels[index].to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()  # GradientFlow's optimizer hook closes the step's record first
            losses.append(loss.detach())
    seconds = time.perf_counter() - start
    return model, flow, torch.stack(losses).cpu().tolist(), seconds


# ----------------------------------------------------------------------------------------- measures
def _finite(values):
    return [v for v in values if math.isfinite(v)]


def _spread(values) -> float:
    """max / min of the per-layer norms (inf when some layer's gradient is exactly 0)."""
    vals = _finite(values)
    if not vals:
        return math.nan
    low = min(vals)
    return math.inf if low <= 0 else max(vals) / low


def _spread_nonzero(values) -> float:
    """max / min over the layers whose gradient is not exactly 0."""
    return _spread([v for v in _finite(values) if v > 0])


def _zeros(values) -> int:
    return sum(1 for v in values if v == 0)


def measure(net: str, flow: GradientFlow, losses: list[float], seconds: float) -> dict:
    """The numbers the verdict and the plots use. "start" is step 0 (the initialisation); "end" is the mean
    over the last ``window`` steps (a tenth of the run), for the per-layer gradient norms and the loss."""
    names, norms = flow.norms("all")  # the recorder already kept only the main-path weights
    window = max(1, len(losses) // 10)
    start, end = norms[0].tolist(), torch.nanmean(norms[-window:], dim=0).tolist()
    result = {
        "layers": names,
        "steps": len(losses),
        "window": window,
        "train_seconds": seconds,
        "loss": losses,
        "loss_start": losses[0],
        "loss_end": sum(losses[-window:]) / window,
        "grad_norms": norms.tolist(),  # [step][layer]
        "grad_norms_end": end,
        "first_to_last_ratio": {"start": start[0] / last_or_nan(start), "end": end[0] / last_or_nan(end)},
        "spread_max_over_min": {"start": _spread(start), "end": _spread(end)},
        "spread_over_nonzero_layers": {"start": _spread_nonzero(start), "end": _spread_nonzero(end)},
        "layers_with_zero_grad": {"start": _zeros(start), "end": _zeros(end)},
    }
    if flow.blocks:
        per_block = {}
        for block, series in flow.history()["blocks"].items():
            per_block[block] = {}
            for field in ("input", "branch", "shortcut"):
                tail = [v for v in series[field][-window:] if math.isfinite(v)]
                per_block[block][field] = {"start": series[field][0],
                                           "end": sum(tail) / len(tail) if tail else math.nan}
        result["blocks"] = per_block
    return result


def last_or_nan(values) -> float:
    return values[-1] if values[-1] != 0 else math.nan


def _kind(ratio: float) -> str:
    """Names a first/last ratio; the thresholds (0.1 and 10) are stated in the verdict's first line."""
    if not math.isfinite(ratio):
        return "not measurable (non-finite gradients)"
    if ratio == 0:
        return "vanished completely: the first layer's gradient is exactly 0 in fp32 (underflow)"
    if ratio < 0.1:
        return f"vanishing: the first layer's gradient is {1 / ratio:.3g}x smaller than the last layer's"
    if ratio > 10:
        return f"exploding toward the input: the first layer's gradient is {ratio:.3g}x larger than the last's"
    return "within 10x either way: neither vanishing nor exploding"


def verdict(results: dict) -> str:
    """Sentences computed from the measured numbers in ``results`` (the content of results.json)."""
    nets = results["nets"]
    cfg = results["config"]
    lines = [f"Measured on {cfg['device']} with depth {cfg['depth']}, width {cfg['width']}, batch "
             f"{cfg['batch_size']}, {cfg['image_size']}x{cfg['image_size']} {cfg['data']} images, "
             f"{cfg['steps']} SGD steps (lr {cfg['lr']}, momentum 0.9), seed {cfg['seed']}. "
             "Gradient norms are L2 norms of each conv/linear weight's gradient; 'ratio' is first conv / "
             "final linear layer (below 0.1 is called vanishing, above 10 exploding); 'spread' is largest / "
             "smallest over all main-path weight layers. 'End' values are means over the last "
             f"{next(iter(nets.values()))['window']} steps.", ""]
    def spread_text(r, when):
        text = f"spread {r['spread_max_over_min'][when]:.3g}"
        zeros = r["layers_with_zero_grad"][when]
        if zeros:
            text += (f" ({zeros} of {len(r['layers'])} layers have a gradient of exactly 0 (fp32 underflow); "
                     f"over the others the spread is {r['spread_over_nonzero_layers'][when]:.3g})")
        return text

    for net, r in nets.items():
        s0, s1 = r["first_to_last_ratio"]["start"], r["first_to_last_ratio"]["end"]
        l0, l1 = r["loss_start"], r["loss_end"]
        if not math.isfinite(l1):
            learned = "training diverged (non-finite loss)"
        elif l1 < 0.5 * CHANCE_LOSS:
            learned = "it learned (final loss below half of chance level)"
        elif l1 > 0.9 * CHANCE_LOSS:
            learned = "it did not learn (final loss within 10% of chance level or above)"
        else:
            learned = "it learned partially"
        lines.append(
            f"{net}: at step 0 ratio {s0:.3g} ({_kind(s0)}), {spread_text(r, 'start')}; at the end "
            f"ratio {s1:.3g} ({_kind(s1)}), {spread_text(r, 'end')}. Training loss {l0:.3f} at step 0, "
            f"{l1:.3f} at the end (chance is ln 10 = {CHANCE_LOSS:.3f}): {learned}.")
    lines.append("")
    if "residual" in nets:
        for when, label in (("start", "At step 0"), ("end", "At the end")):
            res = nets["residual"]["spread_max_over_min"][when]
            for other in ("plain_sigmoid", "plain_bn"):
                if other not in nets:
                    continue
                o = nets[other]["spread_max_over_min"][when]
                cmp = "smaller" if res < o else "larger" if res > o else "equal to"
                if cmp == "equal to":
                    how = "."
                elif math.isinf(o) or math.isinf(res):
                    how = " (an infinite spread means some layers' gradients are exactly 0)."
                else:
                    how = f" by {max(o, res) / min(o, res):.3g}x."
                lines.append(f"{label} the residual network's spread ({res:.3g}) is {cmp} than {other}'s "
                             f"({o:.3g}){how}")
        blocks = nets["residual"].get("blocks", {})
        shares = [b["shortcut"]["start"] / b["input"]["start"] for b in blocks.values()
                  if b["input"]["start"] and math.isfinite(b["shortcut"]["start"])]
        branch = [b["branch"]["start"] / b["input"]["start"] for b in blocks.values()
                  if b["input"]["start"] and math.isfinite(b["branch"]["start"])]
        if shares:
            lines.append(
                f"In the residual network at step 0, over its {len(shares)} blocks, the gradient arriving at a "
                f"block's input through the shortcut had {min(shares):.2f}-{max(shares):.2f} (mean "
                f"{sum(shares) / len(shares):.2f}) of the norm of the total gradient there, and the part through "
                f"the residual branch {min(branch):.2f}-{max(branch):.2f} (mean {sum(branch) / len(branch):.2f}).")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- plots
COLOURS = {"plain_sigmoid": "C3", "plain_bn": "C1", "residual": "C0"}


def plot_losses(results: dict, path: str) -> None:
    from fastres.diagnostics import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for net, r in results["nets"].items():
        loss = torch.tensor(r["loss"], dtype=torch.float64)
        window = max(1, min(5, len(loss)))  # trailing moving average: the trend through batch noise
        smooth = loss.cumsum(0)
        smooth[window:] = smooth[window:] - smooth[:-window]
        smooth /= torch.arange(1, len(loss) + 1).clamp(max=window)
        ax.plot(loss.tolist(), color=COLOURS.get(net), linewidth=0.8, alpha=0.35)
        ax.plot(smooth.tolist(), color=COLOURS.get(net), linewidth=1.6, label=net)
    ax.axhline(CHANCE_LOSS, color="gray", linestyle=":", label="chance (ln 10)")
    cfg = results["config"]
    ax.set_title(f"training loss, depth {cfg['depth']} ({cfg['data']} data, {cfg['device']})\n"
                 "thin: per step; thick: trailing mean of 5 steps", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_depth(results: dict, path: str) -> None:
    from fastres.diagnostics import _pyplot

    plt = _pyplot()
    nets = results["nets"]
    has_blocks = "residual" in nets and nets["residual"].get("blocks")
    panels = 3 if has_blocks else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    first = next(iter(nets.values()))
    end_label = f"mean of steps {first['steps'] - first['window']}-{first['steps'] - 1}"
    for ax, key, when in ((axes[0], "start", "step 0 (initialisation)"), (axes[1], "end", end_label)):
        for net, r in nets.items():
            values = r["grad_norms"][0] if key == "start" else r["grad_norms_end"]
            norms = [v if v is not None and v > 0 else math.nan for v in values]
            zeros = _zeros(values)
            label = net + (f" ({zeros} layers exactly 0, not drawn)" if zeros else "")
            ax.plot(range(1, len(norms) + 1), norms, ".-", color=COLOURS.get(net), label=label,
                    linewidth=1, markersize=3)
        ax.set_yscale("log")
        ax.set_xlabel("layer (1 = first conv, last = linear)")
        ax.set_ylabel("weight gradient L2 norm")
        ax.set_title(f"gradient norm by depth, {when}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if has_blocks:
        ax = axes[2]
        blocks = nets["residual"]["blocks"]
        x = range(1, len(blocks) + 1)
        for field, colour in (("shortcut", "C0"), ("branch", "C3")):
            for when, style in (("start", "-"), ("end", "--")):
                ax.plot(x, [b[field][when] for b in blocks.values()], style, color=colour, marker=".",
                        label=f"via {field}, {'step 0' if when == 'start' else end_label}")
        ax.set_yscale("log")
        ax.set_xlabel("residual block (input -> output)")
        ax.set_ylabel("gradient norm entering the block")
        ax.set_title("residual net: shortcut vs branch")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastres.demo.vanishing_gradients",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=56, help="6n + 2 layers (default 56, like ResNet-56)")
    p.add_argument("--steps", type=int, default=40, help="training steps per network (default 40)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="vanishing_gradients_out", help="output folder")
    p.add_argument("--width", type=int, default=8, help="channels of the first stage (default 8)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=2048, help="synthetic training set size")
    p.add_argument("--cifar10", metavar="ROOT", default=None,
                   help="train on CIFAR-10 from ROOT (torchvision layout; nothing is downloaded)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: the default sizes are too small to gain from more, "
                        "and oversubscribed cores make more threads much slower); 0 keeps torch's setting")
    p.add_argument("--per-net-plots", action="store_true",
                   help="also write grad_flow_<net>.png (GradientFlow.plot for each network)")
    p.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    args = p.parse_args(argv)
    _stage_plan(args.depth, args.width)  # validates --depth
    args.nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    for n in args.nets:
        if n not in NETS:
            p.error(f"unknown network {n!r} in --nets; choose from {NETS}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def run(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but no CUDA device is visible")
    os.makedirs(args.out, exist_ok=True)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    block, block_desc = basic_block_class()
    if args.cifar10:
        images, labels = cifar10_data(args.cifar10, args.image_size)
        data = "CIFAR-10"
    else:
        images, labels = synthetic_data(args.samples, args.image_size, args.seed)
        data = "synthetic"
    if device.type == "cuda":
        images, labels = images.to(device), labels.to(device)
    # On CPU fastres's ops run their pure-PyTorch backend ("auto" picks it too); the Triton interpreter
    # would be far too slow for a demo.
    backend = "torch" if device.type == "cpu" else fastres.get_backend()
    results = {"config": {"depth": args.depth, "steps": args.steps, "device": str(device), "width": args.width,
                          "batch_size": args.batch_size, "image_size": args.image_size, "lr": args.lr,
                          "seed": args.seed, "data": data, "cpu_threads": torch.get_num_threads(),
                          "residual_block": block_desc,
                          "fastres_backend": backend, "torch": torch.__version__},
               "nets": {}}
    log(f"residual network blocks: {block_desc}; fastres backend: {backend}; device: {device}")
    with fastres.use_backend(backend):
        for net in args.nets:
            model, flow, losses, seconds = train(net, args, images, labels, device, block)
            results["nets"][net] = measure(net, flow, losses, seconds)
            with open(os.path.join(args.out, f"summary_{net}.txt"), "w") as f:
                f.write(flow.summary() + "\n")
            if args.per_net_plots:
                flow.plot(os.path.join(args.out, f"grad_flow_{net}.png"), title=f"{net}: gradient norm by depth")
            log(f"{net}: {args.steps} steps in {seconds:.1f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    text = verdict(results)
    results["verdict"] = text
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(_json_safe(results), f, indent=1)
    with open(os.path.join(args.out, "verdict.txt"), "w") as f:
        f.write(text)
    plot_losses(results, os.path.join(args.out, "loss_curves.png"))
    plot_depth(results, os.path.join(args.out, "grad_norm_by_depth.png"))
    print(text)
    log(f"wrote {args.out}/: loss_curves.png grad_norm_by_depth.png results.json verdict.txt summary_<net>.txt"
        + (" grad_flow_<net>.png" if args.per_net_plots else ""))
    return results


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
