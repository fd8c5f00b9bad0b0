"""fastres.functional.sync_batch_norm_act across two processes (gloo on CPU; NCCL on two GPUs).

Each rank normalises its slice of one global batch. The outputs and gradients of every rank, and the
running statistics, must match by the tolerance rule a single process over the concatenated batch
(fp64 reference vs eager in the same dtype) — and, on GPUs, nn.SyncBatchNorm (CUDA-only in PyTorch).
Running statistics must be bitwise identical on every rank, and a rerun bitwise identical.

One spawn runs every case (a spawn costs seconds); the tests below check what it handed back.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch

import fastres
from fastres.functional import batch_norm_act, sync_batch_norm_act
from dist_helpers import run_distributed
from helpers import assert_rule, assert_rule_composition, eager_batch_norm_act

EPS = 1e-5


@dataclass(frozen=True)
class Case:
    sizes: tuple            # batch size on each rank (uneven, even empty, is allowed)
    C: int = 5
    HW: tuple = (3, 4)
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    affine: bool = True
    residual: bool = True
    relu: bool = True
    track: bool = True
    momentum: float = 0.1
    mean: float = 0.0       # a large offset catches a Σx² − (Σx)² variance
    seed: int = 0

    def full_shape(self):
        return (sum(self.sizes), self.C) + tuple(self.HW)


CASES = {
    "fp32_even_res_relu": Case(sizes=(2, 2)),
    "fp32_uneven_nhwc_offset": Case(sizes=(3, 1), channels_last=True, residual=False, mean=50.0,
                                    seed=1),
    "bf16_uneven_res": Case(sizes=(1, 3), dtype=torch.bfloat16, seed=2),
    "fp16_noaffine": Case(sizes=(2, 3), dtype=torch.float16, affine=False, residual=False, seed=3),
    "fp32_noact_untracked": Case(sizes=(2, 1), relu=False, track=False, seed=4),
    "one_value_on_a_rank": Case(sizes=(1, 2), HW=(1, 1), C=3, seed=5),
    "empty_rank": Case(sizes=(3, 0), seed=6),
    "momentum_0": Case(sizes=(2, 2), momentum=0.0, residual=False, seed=7),
}


def make_global_batch(case: Case):
    """The global batch (every rank builds the same, then takes its slice) in the case's dtype."""
    g = torch.Generator().manual_seed(1000 + case.seed)
    shape = case.full_shape()
    x = (torch.randn(shape, generator=g) + case.mean).to(case.dtype)
    residual = torch.randn(shape, generator=g).to(case.dtype) if case.residual else None
    grad_out = torch.randn(shape, generator=g).to(case.dtype)
    weight = torch.randn(case.C, generator=g) if case.affine else None
    bias = torch.randn(case.C, generator=g) if case.affine else None
    running_mean = torch.randn(case.C, generator=g) if case.track else None
    running_var = torch.rand(case.C, generator=g) + 0.5 if case.track else None
    return dict(x=x, residual=residual, grad_out=grad_out, weight=weight, bias=bias,
                running_mean=running_mean, running_var=running_var)


def rank_slice(case: Case, rank: int) -> slice:
    start = sum(case.sizes[:rank])
    return slice(start, start + case.sizes[rank])


def _layout(t, case):
    if t is None:
        return None
    return t.contiguous(memory_format=torch.channels_last) if case.channels_last else t.contiguous()


def _run_local(fn, case, batch, rank, device, no_host_sync=False):
    """Forward + backward of ``fn`` on this rank's slice; returns outputs, grads, running stats."""
    sl = rank_slice(case, rank)
    x = _layout(batch["x"][sl], case).to(device).requires_grad_()
    res = batch["residual"]
    res = None if res is None else _layout(res[sl], case).to(device).requires_grad_()
    w = None if batch["weight"] is None else batch["weight"].to(device).clone().requires_grad_()
    b = None if batch["bias"] is None else batch["bias"].to(device).clone().requires_grad_()
    rm = None if batch["running_mean"] is None else batch["running_mean"].to(device).clone()
    rv = None if batch["running_var"] is None else batch["running_var"].to(device).clone()
    grad_out = _layout(batch["grad_out"][sl], case).to(device)
    if no_host_sync:  # any host synchronisation in forward or backward raises
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        y = fn(x, rm, rv, w, b, res)
        y.backward(grad_out)
    finally:
        if no_host_sync:
            torch.cuda.set_sync_debug_mode("default")
    out = dict(y=y, dx=x.grad, dres=None if res is None else res.grad,
               dw=None if w is None else w.grad, db=None if b is None else b.grad, rm=rm, rv=rv)
    return {k: (None if v is None else v.detach().cpu()) for k, v in out.items()}


def _fastres_fn(case, process_group=None):
    act = "relu" if case.relu else None

    def fn(x, rm, rv, w, b, res):
        return sync_batch_norm_act(x, rm, rv, w, b, case.momentum, EPS, res, act, process_group)
    return fn


def _nn_sync_fn(case):
    def fn(x, rm, rv, w, b, res):
        m = torch.nn.SyncBatchNorm(case.C, eps=EPS, momentum=case.momentum, affine=case.affine,
                                   track_running_stats=case.track).to(x.device)
        with torch.no_grad():
            if case.affine:
                m.weight.copy_(w)
                m.bias.copy_(b)
            if case.track:
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
        y = m(x)
        if res is not None:
            y = y + res
        y = torch.relu(y) if case.relu else y
        fn.module = m
        return y
    return fn


def _run_nn_sync(case, batch, rank, device):
    fn = _nn_sync_fn(case)
    out = _run_local(fn, case, batch, rank, device)
    m = fn.module
    out["dw"] = m.weight.grad.cpu() if case.affine else None
    out["db"] = m.bias.grad.cpu() if case.affine else None
    out["rm"] = m.running_mean.cpu() if case.track else None
    out["rv"] = m.running_var.cpu() if case.track else None
    return out


MODEL_SIZES = (3, 2)  # per-rank batch of the module-level check


def small_resnet():
    """A torchvision-style model: stem conv-BN-ReLU, a BasicBlock with a downsample, a last BN
    with no ReLU after it (sync_bn converts that one too)."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    downsample = torch.nn.Sequential(torch.nn.Conv2d(6, 8, 1, stride=2, bias=False),
                                     torch.nn.BatchNorm2d(8))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(inplace=True), BasicBlock(6, 8, stride=2, downsample=downsample),
        torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4))
    for m in model.modules():  # non-trivial affine parameters and running stats
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def model_batch():
    g = torch.Generator().manual_seed(123)
    shape = (sum(MODEL_SIZES), 3, 6, 6)
    return torch.randn(shape, generator=g) + 1.0, torch.randn(sum(MODEL_SIZES), 4, 3, 3,
                                                              generator=g)


def run_model(model, x, grad_out):
    """Training step then an eval forward: (y, dx, {param grads}, {buffers}, eval y)."""
    x = x.detach().clone().requires_grad_()
    model.train()
    y = model(x)
    y.backward(grad_out)
    inner = getattr(model, "_orig_mod", model)  # a compiled model's parameters, by their own names
    grads = {k: p.grad.detach().clone() for k, p in inner.named_parameters()}
    buffers = {k: b.detach().clone() for k, b in inner.named_buffers()}
    model.eval()
    with torch.no_grad():
        y_eval = model(x.detach())
    return dict(y=y.detach(), dx=x.grad, grads=grads, buffers=buffers, y_eval=y_eval)


def _model_checks(rank, device):
    """fastres.convert(sync_bn=True) on each rank's slice, eager and compiled (fullgraph, with an
    explicit ProcessGroup in the modules): no graph break, compiled == eager."""
    x, grad_out = model_batch()
    sl = slice(sum(MODEL_SIZES[:rank]), sum(MODEL_SIZES[:rank + 1]))
    x, grad_out = x[sl].to(device), grad_out[sl].to(device)
    eager = run_model(fastres.convert(small_resnet(), sync_bn=True).to(device), x, grad_out)
    torch._dynamo.reset()
    model = fastres.convert(small_resnet(), sync_bn=True,
                            process_group=torch.distributed.group.WORLD).to(device)
    compiled = run_model(torch.compile(model, fullgraph=True, backend="aot_eager"), x, grad_out)
    to_cpu = lambda r: {k: ({n: t.cpu() for n, t in v.items()} if isinstance(v, dict) else v.cpu())
                        for k, v in r.items()}
    return to_cpu(eager), to_cpu(compiled)


def sync_worker(rank, world_size, device, backends):
    """Every case on this rank, for each backend; on CUDA also nn.SyncBatchNorm and a host-sync
    check. Returns {(backend, case): {"fastres": ..., "rerun": ..., "nn": ...}, "compile": ...}."""
    results = {}
    for backend in backends:
        with fastres.use_backend(backend):
            for name, case in CASES.items():
                if device == "cuda" and case.dtype == torch.float64:
                    continue
                batch = make_global_batch(case)
                fn = _fastres_fn(case)
                # A rank holding 0 or 1 values per channel reads the global count (to raise when
                # it is 1, fastres.functional._check_global_count); every other rank must not sync.
                counts_ok = min(case.sizes) * case.HW[0] * case.HW[1] > 1
                first = _run_local(fn, case, batch, rank, device,
                                   no_host_sync=device == "cuda" and counts_ok)
                entry = {"fastres": first, "rerun": _run_local(fn, case, batch, rank, device)}
                if device == "cuda" and 0 not in case.sizes:
                    entry["nn"] = _run_nn_sync(case, batch, rank, device)
                results[(backend, name)] = entry
    results["model"] = _model_checks(rank, device)
    return results


def available_backends(device):
    names = ["torch"]
    if fastres.backend_status()["triton"][0] and importlib.util.find_spec(
            "fastres.triton.batch_norm_act") is not None:
        names.append("triton")
    if device == "cuda" and fastres.backend_status()["cuda"][0]:
        names.append("cuda")
    return names


# --------------------------------------------------------------------------------------------------
# Single-process references over the concatenated batch.


def reference(case: Case, dtype):
    """Eager over the global batch in ``dtype`` (fp64: the reference), parameters in fp32 (fp64 for
    the reference): full-batch outputs, grads and running stats; and per rank the LOCAL weight/bias
    grads (what SyncBN hands each rank before DDP averages), from eager eval-mode BN of that rank's
    slice with the global batch statistics."""
    batch = make_global_batch(case)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    act = "relu" if case.relu else None

    def leaf(t, d=dtype, layout=False):
        if t is None:
            return None
        t = _layout(t, case) if layout else t
        return t.to(d).clone().requires_grad_()

    x, res = leaf(batch["x"], layout=True), leaf(batch["residual"], layout=True)
    w, b = leaf(batch["weight"], pd), leaf(batch["bias"], pd)
    rm = None if batch["running_mean"] is None else batch["running_mean"].to(pd).clone()
    rv = None if batch["running_var"] is None else batch["running_var"].to(pd).clone()
    grad_out = _layout(batch["grad_out"], case).to(dtype)
    y = eager_batch_norm_act(x, rm, rv, w, b, True, case.momentum, EPS, res, act)
    y.backward(grad_out)
    out = dict(y=y.detach(), dx=x.grad, dres=None if res is None else res.grad, rm=rm, rv=rv,
               dw=[], db=[])
    var, mean = torch.var_mean(x.detach().to(pd), dim=(0, 2, 3), correction=0)
    for rank in range(len(case.sizes)):
        sl = rank_slice(case, rank)
        wr, br = leaf(batch["weight"], pd), leaf(batch["bias"], pd)
        if wr is not None:
            xr = x.detach()[sl]
            rr = None if res is None else res.detach()[sl]
            yr = eager_batch_norm_act(xr, mean, var, wr, br, False, 0.0, EPS, rr, act)
            yr.backward(grad_out[sl])
        for key, t in (("dw", wr), ("db", br)):
            out[key].append(None if t is None else (
                t.grad if t.grad is not None else torch.zeros_like(t)))
    return out


def check_rank_results(case, per_rank, what, nn_per_rank=None):
    """Tolerance rule for every rank's outputs, grads and running stats."""
    ref = reference(case, torch.float64)
    eager = reference(case, case.dtype)
    for rank, got in enumerate(per_rank):
        sl = rank_slice(case, rank)
        baselines = [("single process", lambda k: eager[k][sl] if k in ("y", "dx", "dres")
                      else eager[k][rank] if k in ("dw", "db") else eager[k])]
        if nn_per_rank is not None:
            baselines.append(("nn.SyncBatchNorm", lambda k, r=rank: nn_per_rank[r][k]))
        for key in ("y", "dx", "dres", "dw", "db", "rm", "rv"):
            if got[key] is None:
                assert ref[key] is None or (isinstance(ref[key], list) and ref[key][rank] is None)
                continue
            r = ref[key][sl] if key in ("y", "dx", "dres") else (
                ref[key][rank] if key in ("dw", "db") else ref[key])
            for base_name, base in baselines:
                e = base(key)
                # Ranks sum in another order than one process: a composition of reductions.
                assert_rule_composition(got[key], e, r,
                                        name=f"{what} rank {rank} {key} vs {base_name}")
    # Identical on every rank, bitwise: the running statistics (and nothing else is shared).
    for key in ("rm", "rv"):
        if per_rank[0][key] is not None:
            for rank in range(1, len(per_rank)):
                assert torch.equal(per_rank[0][key], per_rank[rank][key]), (
                    f"{what}: {key} differs between rank 0 and rank {rank}")


# --------------------------------------------------------------------------------------------------
# gloo on CPU.


@pytest.fixture(scope="module")
def gloo_results():
    backends = available_backends("cpu")
    return backends, run_distributed(sync_worker, 2, "gloo", args=("cpu", backends))


@pytest.mark.parametrize("case_name", list(CASES))
def test_gloo_matches_single_process(gloo_results, case_name):
    backends, per_rank = gloo_results
    for backend in backends:
        got = [r[(backend, case_name)]["fastres"] for r in per_rank]
        check_rank_results(CASES[case_name], got, f"{backend}/{case_name}")


@pytest.mark.parametrize("case_name", list(CASES))
def test_gloo_deterministic(gloo_results, case_name):
    backends, per_rank = gloo_results
    for backend in backends:
        for rank, r in enumerate(per_rank):
            first, rerun = r[(backend, case_name)]["fastres"], r[(backend, case_name)]["rerun"]
            for key, t in first.items():
                if t is not None:
                    assert torch.equal(t, rerun[key]), f"{backend}/{case_name} rank {rank} {key}"


def _sliced_forward(module, xs):
    """``module`` (small_resnet's module types) applied to the per-rank slices ``xs`` in eager, as
    data-parallel training runs it: every convolution, ReLU and add on each slice separately, and
    every BN normalising each slice with the statistics of all slices (SyncBN's math, autograd
    flowing across slices through them)."""
    from torchvision.models.resnet import BasicBlock

    if isinstance(module, torch.nn.Sequential):
        for child in module:
            xs = _sliced_forward(child, xs)
        return xs
    if isinstance(module, torch.nn.BatchNorm2d):
        var, mean = torch.var_mean(torch.cat(xs), dim=(0, 2, 3), correction=0)
        scale = torch.rsqrt(var + module.eps).view(1, -1, 1, 1)
        mean = mean.view(1, -1, 1, 1)
        w, b = module.weight.view(1, -1, 1, 1), module.bias.view(1, -1, 1, 1)
        return [(x - mean) * scale * w + b for x in xs]
    if isinstance(module, BasicBlock):
        out = _sliced_forward(torch.nn.Sequential(module.conv1, module.bn1, module.relu,
                                                  module.conv2, module.bn2), xs)
        identity = xs if module.downsample is None else _sliced_forward(module.downsample, xs)
        return [torch.relu(o + i) for o, i in zip(out, identity)]
    if isinstance(module, torch.nn.ReLU):
        return [torch.relu(x) for x in xs]
    assert isinstance(module, torch.nn.Conv2d), type(module)
    return [module(x) for x in xs]


def data_parallel_eager_grads(model, x, grad_out):
    """The parameter gradients of eager data-parallel training over MODEL_SIZES ranks, in one
    process: each slice's local gradient accumulated in fp32, then the slices' sum (autograd's
    accumulation across the per-slice uses of a parameter, as DDP's all-reduce adds the ranks'
    fp32 gradients). Eager's precision class for Σ over ranks of local gradients: it carries the
    rounding of each rank's partial sum, which a single process over the whole batch does not."""
    bounds = [sum(MODEL_SIZES[:r]) for r in range(len(MODEL_SIZES) + 1)]
    xs = [x[a:b] for a, b in zip(bounds, bounds[1:])]
    gs = [grad_out[a:b] for a, b in zip(bounds, bounds[1:])]
    model.train()
    ys = _sliced_forward(model, xs)
    params = dict(model.named_parameters())
    torch.autograd.backward(ys, gs)
    return {k: p.grad.detach().clone() for k, p in params.items()}


def check_model_results(per_rank, what):
    """Converted model with sync_bn on each rank vs the unconverted model over the whole batch: outputs
    and input grads per slice, Σ over ranks of the local parameter grads (what DDP all-reduces),
    running stats (bitwise identical on every rank), and the eval output after the step."""
    x, grad_out = model_batch()
    single = {}
    for name, dtype in (("ref", torch.float64), ("eager", torch.float32)):
        model = small_resnet().to(dtype)
        single[name] = run_model(model, x.to(dtype), grad_out.to(dtype))
    fused = [r[0] for r in per_rank]
    for rank, got in enumerate(fused):
        sl = slice(sum(MODEL_SIZES[:rank]), sum(MODEL_SIZES[:rank + 1]))
        for key in ("y", "dx", "y_eval"):
            assert_rule_composition(got[key], single["eager"][key][sl], single["ref"][key][sl],
                        name=f"{what} rank {rank} {key}")
        for k, t in got["buffers"].items():
            assert torch.equal(t, fused[0]["buffers"][k]), f"{what}: {k} differs between ranks"
            if t.is_floating_point():
                assert_rule_composition(t, single["eager"]["buffers"][k], single["ref"]["buffers"][k],
                            name=f"{what} rank {rank} {k}")
            else:
                assert torch.equal(t, single["eager"]["buffers"][k]), f"{what}: {k}"
    # Σ over ranks of the local gradients: eager's class is eager over the whole batch and eager
    # data-parallel (each rank's partial gradient rounded to fp32 before the sum).
    data_parallel = data_parallel_eager_grads(small_resnet(), x, grad_out)
    for k in fused[0]["grads"]:
        total = sum(r["grads"][k].double() for r in fused).float()
        assert_rule_composition(total, [single["eager"]["grads"][k], data_parallel[k]],
                                single["ref"]["grads"][k], name=f"{what} Σ grad {k}")


def test_gloo_convert_sync_bn_model(gloo_results):
    _, per_rank = gloo_results
    check_model_results([r["model"] for r in per_rank], "gloo model")


def test_gloo_compile_fullgraph_with_process_group(gloo_results):
    _, per_rank = gloo_results
    for rank, r in enumerate(per_rank):
        eager, compiled = r["model"]
        for key in ("y", "dx", "y_eval"):
            assert torch.equal(eager[key], compiled[key]), f"rank {rank} {key}"
        for group in ("grads", "buffers"):
            for k in eager[group]:
                assert torch.equal(eager[group][k], compiled[group][k]), f"rank {rank} {k}"


# --------------------------------------------------------------------------------------------------
# Single-process behaviour: fallback, argument errors.


def test_falls_back_without_process_group():
    """Without torch.distributed initialised it is training-mode batch_norm_act."""
    case = CASES["fp32_even_res_relu"]
    batch = make_global_batch(case)
    x, res = batch["x"], batch["residual"]
    rm1, rv1 = batch["running_mean"].clone(), batch["running_var"].clone()
    rm2, rv2 = batch["running_mean"].clone(), batch["running_var"].clone()
    y1 = sync_batch_norm_act(x, rm1, rv1, batch["weight"], batch["bias"], 0.1, EPS, res)
    y2 = batch_norm_act(x, rm2, rv2, batch["weight"], batch["bias"], True, 0.1, EPS, res)
    assert torch.equal(y1, y2) and torch.equal(rm1, rm2) and torch.equal(rv1, rv2)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(2, 3, 4)), "4-D"),
    (dict(weight=torch.randn(4)), "weight must have shape"),
    (dict(residual=torch.randn(2, 3, 4, 5)), "residual shape"),
    (dict(momentum=None), "momentum"),
    (dict(activation="gelu"), "activation"),
])
def test_bad_arguments(bad, match):
    args = dict(x=torch.randn(2, 3, 4, 4), weight=torch.randn(3), residual=None, momentum=0.1,
                activation="relu")
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        sync_batch_norm_act(args["x"], torch.zeros(3), torch.ones(3), args["weight"], None,
                            args["momentum"], EPS, args["residual"], args["activation"])


def test_convert_sync_bn_marks_every_batch_norm():
    """sync_bn=True: every BN (also one with no ReLU after it) is a BatchNormAct2d on the "world"
    group; the state_dict is unchanged; without torch.distributed it runs as the unsynchronised one."""
    model = small_resnet()
    synced, report = fastres.convert(model, sync_bn=True, return_report=True)
    local = fastres.convert(model)
    bns = [m for m in synced.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 5 and not report.left
    assert all(isinstance(m, fastres.BatchNormAct2d) and m.process_group == "world" for m in bns)
    assert all(m.process_group is None for m in local.modules()
               if isinstance(m, fastres.BatchNormAct2d))
    assert synced.state_dict().keys() == model.state_dict().keys()
    local[5] = fastres.BatchNormAct2d.from_batch_norm(local[5], activation=None)
    x = model_batch()[0]
    assert torch.equal(synced.train()(x), local.train()(x))
    for a, b in zip(synced.buffers(), local.buffers()):
        assert torch.equal(a, b)


def test_sync_bn_bad_process_group():
    with pytest.raises(ValueError, match="sync_bn=True"):
        fastres.convert(small_resnet(), process_group="world")
    with pytest.raises(TypeError, match="process_group must be"):
        fastres.convert(small_resnet(), sync_bn=True, process_group="all of them")
    with pytest.raises(TypeError, match="process_group must be"):
        fastres.BatchNormAct2d(4, process_group=3)


# --------------------------------------------------------------------------------------------------
# NCCL on two GPUs: also against nn.SyncBatchNorm, and no host synchronisation.


def _two_gpus():
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices")
def test_nccl_matches_nn_sync_batch_norm():
    backends = available_backends("cuda")
    per_rank = run_distributed(sync_worker, 2, "nccl", args=("cuda", backends))
    for backend in backends:
        for name, case in CASES.items():
            entries = [r[(backend, name)] for r in per_rank]
            nn_results = [e["nn"] for e in entries] if "nn" in entries[0] else None
            check_rank_results(case, [e["fastres"] for e in entries], f"nccl/{backend}/{name}",
                               nn_results)
            for e in entries:
                for key, t in e["fastres"].items():
                    if t is not None:
                        assert torch.equal(t, e["rerun"][key]), f"nccl/{backend}/{name} {key}"
    check_model_results([r["model"] for r in per_rank], "nccl model")
