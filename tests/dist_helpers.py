"""Run a function on a few local processes joined in a torch.distributed group (gloo on CPU, NCCL on
GPUs). A spawn costs seconds, so tests batch many checks into one run and hand results back as files.
"""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, backend, out_dir, args):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size=2, backend="gloo", args=()):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the list of what each
    rank returned (loaded on CPU). A failure in any rank raises here with that rank's traceback.

    ``fn`` must be a module-level function. Children inherit the environment, so TRITON_INTERPRET=1
    (set by tests/conftest.py before triton is imported) holds there too."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), backend, out_dir, args),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
