"""Train a torchvision ResNet with fastres's fused BatchNorm(+add)+ReLU, on one process or many.

    # one process (GPU if there is one), synthetic data
    python examples/train_resnet.py --arch resnet50 --batch-size 128 --amp --channels-last --compile
    # DDP over 8 GPUs with fastres SyncBatchNorm, ImageFolder data
    torchrun --nproc_per_node=8 examples/train_resnet.py --sync-bn --data /path/to/imagenet/train
    # CIFAR-10 (a folder holding cifar-10-batches-py; nothing is downloaded)
    python examples/train_resnet.py --data /path/to/cifar --image-size 32
    # CPU smoke run: two gloo processes spawned by the script itself
    python examples/train_resnet.py --device cpu --spawn 2 --sync-bn --steps 3 --batch-size 4 \\
        --image-size 32

--no-fastres trains the same torchvision model unconverted (nn.SyncBatchNorm with --sync-bn), for
comparison. Prints the loss and images/s (over all processes, after --warmup steps) with a progress
bar (tqdm if installed) and a final summary line.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

try:
    import fastres
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fastres


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50",
                                                          "resnet101"])
    p.add_argument("--data", default=None,
                   help="ImageFolder root, or a folder with cifar-10-batches-py; default: synthetic")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: 10 for CIFAR-10, the class count of an ImageFolder, 1000 otherwise")
    p.add_argument("--steps", type=int, default=100, help="training steps (per process)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps left out of images/s (compilation, cudnn autotuning); default "
                        "min(5, steps // 2)")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lr", type=float, default=None,
                   help="SGD learning rate; default 0.1 × global batch / 256 (Goyal et al.)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--fastres", action=argparse.BooleanOptionalAction, default=True,
                   help="convert the model with fastres.convert (default) or train it as is")
    p.add_argument("--backend", default="auto", help="fastres backend: auto, triton, cuda, torch")
    p.add_argument("--sync-bn", action="store_true",
                   help="synchronise BatchNorm statistics over all processes")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", "--bf16", dest="amp", action="store_true", help="bf16 autocast")
    p.add_argument("--workers", type=int, default=4, help="data-loader workers (real data)")
    p.add_argument("--spawn", type=int, default=0, metavar="N",
                   help="start N local processes (gloo on CPU, NCCL on GPUs) instead of torchrun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="loss readout interval (a host sync)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Processes and devices.


def setup_distributed(args):
    """(rank, world_size, local_rank, device); joins the process group when launched as several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda given, but no CUDA device is available")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(args.device if args.device not in ("auto", "cuda") else "cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return rank, world_size, local_rank, device


def _spawned(local_rank, args, world_size, port):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(args)


def spawn(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args, args.spawn, port), nprocs=args.spawn)


# --------------------------------------------------------------------------------------------------
# Data.


class SyntheticBatches:
    """A few fixed random batches on the device, cycled: measures the model, not the loader."""

    def __init__(self, batch_size, image_size, num_classes, device, memory_format, seed, count=4):
        g = torch.Generator().manual_seed(seed)
        self.batches = [
            (torch.randn(batch_size, 3, image_size, image_size, generator=g)
             .to(device).contiguous(memory_format=memory_format),
             torch.randint(0, num_classes, (batch_size,), generator=g).to(device))
            for _ in range(count)]

    def __iter__(self):
        while True:
            yield from self.batches


def real_loader(args, world_size, rank):
    """(infinite batch iterator, num_classes) for an ImageFolder or CIFAR-10 folder."""
    import torchvision.datasets as datasets
    import torchvision.transforms as T

    normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    if os.path.isdir(os.path.join(args.data, "cifar-10-batches-py")):
        tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        if args.image_size != 32:
            tf.append(T.Resize(args.image_size))
        dataset = datasets.CIFAR10(args.data, train=True, download=False,
                                   transform=T.Compose(tf + [T.ToTensor(), normalize]))
        num_classes = 10
    else:
        dataset = datasets.ImageFolder(args.data, transform=T.Compose([
            T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
            normalize]))
        num_classes = len(dataset.classes)
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, world_size, rank,
                                                                  shuffle=True, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=args.workers, pin_memory=torch.cuda.is_available(), drop_last=True,
        persistent_workers=args.workers > 0)
    if len(loader) == 0:
        raise SystemExit(f"{args.data}: fewer images than one batch of {args.batch_size} per process")

    def batches():
        epoch = 0
        while True:
            if sampler is not None:
                sampler.set_epoch(epoch)
            yield from loader
            epoch += 1
    return batches(), num_classes


# --------------------------------------------------------------------------------------------------
# Model.


def build_model(args, num_classes, device, distributed):
    import torchvision

    model = getattr(torchvision.models, args.arch)(num_classes=num_classes)
    if args.fastres:
        fastres.set_backend(args.backend)
        model = fastres.convert(model, inplace=True, sync_bn=args.sync_bn and distributed)
    elif args.sync_bn and distributed:
        if device.type != "cuda":
            raise SystemExit("--no-fastres --sync-bn needs CUDA: nn.SyncBatchNorm does not run on "
                             "CPU (fastres's SyncBatchNorm does)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model, backend=args.compile_backend)
    return model, memory_format


# --------------------------------------------------------------------------------------------------
# Training loop.


class Progress:
    """tqdm when installed (rank 0 only), else a line every --log-every steps."""

    def __init__(self, total, enabled, log_every):
        self.enabled, self.log_every, self.bar = enabled, log_every, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step, total, loss, images_per_s):
        if not self.enabled:
            return
        rate = "warming up" if images_per_s is None else f"{images_per_s:.1f} images/s"
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix_str(f"loss {loss:.4f}, {rate}")
        elif loss is not None:
            print(f"step {step}/{total}  loss {loss:.4f}  {rate}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(args):
    rank, world_size, _, device = setup_distributed(args)
    distributed = world_size > 1
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if args.data:
        batches, num_classes = real_loader(args, world_size, rank)
        num_classes = args.num_classes or num_classes
    else:
        num_classes = args.num_classes or 1000
        batches = None
    model, memory_format = build_model(args, num_classes, device, distributed)
    if batches is None:
        batches = iter(SyntheticBatches(args.batch_size, args.image_size, num_classes, device,
                                        memory_format, seed=args.seed + rank))
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size * world_size / 256
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp
                else contextlib.nullcontext())
    warmup = min(5, args.steps // 2) if args.warmup is None else min(args.warmup, args.steps - 1)
    if rank == 0:
        print(f"{args.arch}: {'fastres' if args.fastres else 'torch'} (backend "
              f"{fastres.get_backend() if args.fastres else '-'}), {world_size} process(es) on "
              f"{device.type}, batch {args.batch_size}/process, image {args.image_size}, "
              f"sync_bn={args.sync_bn}, compile={args.compile}, channels_last="
              f"{args.channels_last}, bf16={args.amp}", flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    progress = Progress(args.steps, rank == 0, args.log_every)
    model.train()
    loss_value, images_per_s, start = float("nan"), None, None
    for step in range(1, args.steps + 1):
        if step == warmup + 1:
            sync()
            start = time.perf_counter()
        images, target = next(batches)
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with autocast:
            loss = criterion(model(images), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        read = step % args.log_every == 0 or step == args.steps
        if read:
            loss_value = loss.item()  # the only host sync of the step, every --log-every steps
            if start is not None and step > warmup:
                elapsed = time.perf_counter() - start
                images_per_s = (step - warmup) * args.batch_size * world_size / elapsed
        progress.update(step, args.steps, loss_value if read else None, images_per_s)
    sync()
    progress.close()
    if start is not None:
        images_per_s = (args.steps - warmup) * args.batch_size * world_size / (
            time.perf_counter() - start)
    if rank == 0:
        rate = "unmeasured" if images_per_s is None else f"{images_per_s:.1f}"
        print(f"done: {args.steps} steps, final loss {loss_value:.4f}, images/s {rate} "
              f"(all processes, after {warmup} warmup steps)", flush=True)
    if distributed:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.image_size < 1:
        raise SystemExit("--steps, --batch-size and --image-size must be positive")
    if args.spawn > 1:
        if "WORLD_SIZE" in os.environ:
            raise SystemExit("--spawn starts its own processes; do not combine it with torchrun")
        spawn(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
