"""One two-rank gloo spawn (seconds each) shared by the SyncBN checks of test_semantics_errors.py
and test_gradcheck.py: ``results()`` runs it once per test session and returns each rank's dict."""
from __future__ import annotations

import functools

import torch

import fastres
from fastres.functional import sync_batch_norm_act
from dist_helpers import run_distributed

# Triton on CPU tensors only under the interpreter (the spawned ranks inherit TRITON_INTERPRET).
BACKENDS = ["torch"] + (["triton"] if fastres.backend.triton_interpreting() else [])

ERROR_CASES = {
    # name: (rows on rank 0, rows on rank 1, eps); H = W = 1, so rows = values per channel
    "global_one_value": (1, 0, 1e-5),
    "global_one_value_other_rank": (0, 1, 1e-5),
    "one_value_each": (1, 1, 1e-5),       # global count 2: valid
    "eps_zero": (2, 2, 0.0),
}


def _error_cases(rank):
    out = {}
    for backend in BACKENDS:
        with fastres.use_backend(backend):
            for name, (*rows, eps) in ERROR_CASES.items():
                x = torch.randn(rows[rank], 3, 1, 1, requires_grad=True)
                rm, rv = torch.zeros(3), torch.ones(3)
                try:
                    y = sync_batch_norm_act(x, rm, rv, torch.ones(3), torch.zeros(3), 0.1, eps)
                    y.sum().backward()
                    out[(backend, name)] = ("ok", rm, rv)
                except ValueError as e:
                    out[(backend, name)] = (str(e), rm, rv)
    return out


def _jacobians(f, inputs, eps=1e-6):
    """(numerical, analytical) Jacobians of f at inputs, as torch.autograd.gradcheck builds them:
    central differences, and one vector-Jacobian product per output element. Every call runs, in
    the same order, whatever the values — gradcheck itself stops at the first mismatch, which on
    one rank only would leave the other waiting in a collective."""
    with torch.no_grad():
        columns = []
        for t in inputs:
            flat = t.view(-1)
            for i in range(flat.numel()):
                orig = flat[i].item()
                flat[i] = orig + eps
                plus = f(*inputs).reshape(-1).clone()
                flat[i] = orig - eps
                minus = f(*inputs).reshape(-1).clone()
                flat[i] = orig
                columns.append((plus - minus) / (2 * eps))
    numerical = torch.stack(columns, 1)
    y = f(*inputs)
    rows = []
    for i in range(y.numel()):
        seed = torch.zeros_like(y).view(-1)
        seed[i] = 1
        grads = torch.autograd.grad(y, inputs, seed.view_as(y), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return numerical, torch.stack(rows)


def _sync_gradcheck(rank, checking_rank):
    """Gradient check of this rank's output against this rank's (x, weight, bias, residual), fp64.

    Both ranks must issue the same collectives in the same order, so both build the same-shaped
    Jacobians; the other rank feeds its fixed inputs through ``+ 0·input`` (a perturbation
    changes nothing) and multiplies its output by 0 (its output gradient, which the backward's
    all_reduce would add to the checking rank's, is zero). The checked Jacobian thus includes the
    cross-rank terms through the gathered statistics and the global count. Tolerances as
    tests/test_gradcheck.py's gradcheck calls (atol 1e-7, rtol 1e-6)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 2, 2, 1, generator=g, dtype=torch.float64)
    r = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w, b = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, generator=g,
                                                                         dtype=torch.float64)
    fixed = [t.clone() for t in (x, w, b, r)]
    checking = rank == checking_rank

    def f(xx, ww, bb, rr):
        if not checking:
            xx, ww, bb, rr = (t0 + 0 * t for t0, t in zip(fixed, (xx, ww, bb, rr)))
        y = sync_batch_norm_act(xx, None, None, ww, bb, 0.1, 1e-5, rr, "relu")
        return y if checking else y * 0

    inputs = [t.clone().requires_grad_() for t in (x, w, b, r)]
    with fastres.use_backend("torch"):
        numerical, analytical = _jacobians(f, inputs)
    if torch.allclose(analytical, numerical, atol=1e-7, rtol=1e-6):
        return "ok"
    return (f"Jacobian mismatch: max |analytical - numerical| "
            f"{(analytical - numerical).abs().max().item():.3g}")


def _worker(rank, world_size):
    out = _error_cases(rank)
    for checking_rank in range(world_size):
        out[("gradcheck", checking_rank)] = _sync_gradcheck(rank, checking_rank)
    return out


@functools.lru_cache(maxsize=None)
def results():
    return run_distributed(_worker, 2, "gloo")
