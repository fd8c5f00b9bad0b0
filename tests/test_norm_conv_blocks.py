"""The normconv path of ResNet blocks (fastres.nn.normconv) against torchvision's blocks in eager:
outputs, every gradient (input, conv weights, BN weights and biases, downsample), running statistics
and num_batches_tracked, in training and eval, on CPU under the Triton interpreter (small
shapes)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import Bottleneck as TVBottleneck

import fastres
import helpers
from fastres.nn import normconv

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def normconv_on():
    prev = normconv.get_normconv()
    normconv.set_normconv("on")
    with fastres.use_backend("triton"):
        yield
    normconv.set_normconv(prev)


def make_block(kind, dtype, momentum=0.1, seed=0, sizes=None):
    torch.manual_seed(seed)
    inplanes, planes, stride = (8, 4, 2) if kind == "bottleneck" else (4, 6, 2)
    n, hw = 2, 7
    if sizes is not None:
        n, inplanes, planes, stride, hw = sizes
    cls = TVBottleneck if kind == "bottleneck" else TVBasicBlock
    out = planes * cls.expansion
    downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    block = cls(inplanes, planes, stride, downsample)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.5)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    block = block.to(DEV).to(memory_format=torch.channels_last)
    for m in block.modules():  # activations and conv weights in dtype, BN parameters in fp32
        if isinstance(m, nn.Conv2d):
            m.to(dtype)
    x = torch.randn(n, inplanes, hw, hw, device=DEV).to(dtype)
    return block, x.contiguous(memory_format=torch.channels_last)


def run(block, x, fused, train=True, own_forward=False):
    block.train(train)
    x = x.detach().clone().requires_grad_()
    if own_forward:
        y = block(x)
    elif fused:
        assert normconv.block_uses_normconv(block, x)
        y = normconv.bottleneck_forward(block, x) if hasattr(block, "conv3") \
            else normconv.basic_block_forward(block, x)
    else:
        with fastres.use_backend("torch"):
            y = block(x)
    g = torch.Generator().manual_seed(1)
    y.backward(torch.randn(y.shape, generator=g).to(y.device, y.dtype))
    out = {"y": y, "dx": x.grad}
    for name, p in block.named_parameters():
        if p.requires_grad:
            out["d" + name] = p.grad
    for name, b in block.named_buffers():
        out[name] = b
    return out


def eager_pair(block, x, train):
    ref_block = copy.deepcopy(block).double()
    # Eager runs the block as it is: fp16 convolutions and activations with fp32 BN parameters
    # (ATen's mixed-type batch norm, as the fused path and cuDNN take them). Casting eager's BN
    # parameters to fp16 would make it compute another function (rounded weights), not the
    # fused path's precision class.
    eager_block = copy.deepcopy(block)
    return run(ref_block, x.double(), False, train), run(eager_block, x, False, train)


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_matches_eager(kind, dtype, train):
    block, x = make_block(kind, dtype)
    if not train:  # eval's fused path is for frozen BN (see fastres.nn.normconv)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)
    ref, eager = eager_pair(block, x, train)
    fused = run(copy.deepcopy(block), x, True, train)
    assert fused.keys() == ref.keys()
    for name in ref:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(fused[name], eager[name]), name
            continue
        f, e, r = fused[name], eager[name], ref[name]
        assert f is not None, name
        helpers.assert_rule_composition(f, e, r, name)


def test_momentum_none_counts_batches():
    block, x = make_block("basic", torch.float32, momentum=None)
    ref = run(copy.deepcopy(block), x, False)
    fused = run(block, x, True)
    for name in ("bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
                 "bn2.running_var"):
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-5, atol=1e-6)


def test_default_is_the_fallback_until_measured():
    block, x = make_block("basic", torch.float32)
    normconv.set_normconv("auto")
    assert normconv.NORMCONV_TABLE_DEVICE == "unmeasured"
    assert not normconv.block_uses_normconv(block, x)
    normconv.set_normconv("off")
    assert not normconv.block_uses_normconv(block, x)
    normconv.set_normconv("on")
    assert normconv.block_uses_normconv(block, x)
    block.eval()  # eval with trainable BN parameters keeps the fallback, except without grad
    assert not normconv.block_uses_normconv(block, x)
    with torch.no_grad():
        assert normconv.block_uses_normconv(block, x)
    block.train()
    with fastres.use_backend("torch"):
        assert not normconv.block_uses_normconv(block, x)
    with pytest.raises(ValueError, match="normconv mode"):
        normconv.set_normconv("maybe")


def test_fastres_bottleneck_forward_takes_the_path(monkeypatch):
    calls = []
    chain = normconv._chain
    monkeypatch.setattr(normconv, "_chain", lambda block, x: calls.append(1) or chain(block, x))
    tv_block, x = make_block("bottleneck", torch.float32)
    block = fastres.Bottleneck(8, 4, 2, nn.Sequential(
        nn.Conv2d(8, 16, 1, 2, bias=False), fastres.BatchNormAct2d(16, activation=None)))
    block.load_state_dict(tv_block.state_dict())
    block = block.to(DEV).to(memory_format=torch.channels_last)
    fused = run(block, x, False, own_forward=True)  # the fixture forces the path on
    assert calls == [1]
    ref = run(copy.deepcopy(tv_block).double(), x.double(), False)
    eager = run(copy.deepcopy(tv_block), x, False)
    for name in ref:
        helpers.assert_rule_composition(fused[name], eager[name], ref[name], name) \
            if not name.endswith("num_batches_tracked") else \
            torch.testing.assert_close(fused[name], eager[name])


def test_compiled_block():
    block, x = make_block("basic", torch.float32)
    fused = fastres.BasicBlock(4, 6, 2, nn.Sequential(
        nn.Conv2d(4, 6, 1, 2, bias=False), fastres.BatchNormAct2d(6, activation=None)))
    fused.load_state_dict(block.state_dict())
    twin = copy.deepcopy(fused)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y_ref = twin(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.bn1.running_var, twin.bn1.running_var)
    assert fused.bn1.num_batches_tracked.item() == twin.bn1.num_batches_tracked.item() == 1


@pytest.mark.gpu
@pytest.mark.parametrize("kind, sizes", [("bottleneck", (8, 256, 64, 1, 28)),
                                         ("bottleneck", (8, 256, 128, 2, 28)),
                                         ("basic", (8, 64, 128, 2, 28))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gpu_block_matches_eager(kind, sizes, dtype, train):
    block, x = make_block(kind, dtype, sizes=sizes)
    if not train:
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)
    ref, eager = eager_pair(block, x, train)
    fused = run(copy.deepcopy(block), x, True, train)
    for name in ref:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(fused[name], eager[name]), name
        else:
            helpers.assert_rule_composition(fused[name], eager[name].to(fused[name].dtype), ref[name], name)


@pytest.mark.parametrize("dtype, sizes", [
    (torch.float16, None),
    pytest.param(torch.bfloat16, (16, 256, 64, 2, 28), marks=pytest.mark.gpu),
    pytest.param(torch.float16, (16, 256, 64, 1, 28), marks=pytest.mark.gpu),
])
def test_block_under_autocast(dtype, sizes):
    # AMP training: fp32 parameters and input, the convs in fp16 / bf16 (bf16 dots are wrong
    # under the interpreter: bf16 runs on GPU only).
    block, x = make_block("bottleneck", torch.float32, sizes=sizes)

    def run_amp(block, x, dtype, fused):
        x = x.detach().clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=dtype):
            if fused:
                assert normconv.block_uses_normconv(block, x)
                y = normconv.bottleneck_forward(block, x)
            else:
                with fastres.use_backend("torch"):
                    y = block(x)
        assert y.dtype == dtype
        g = torch.Generator().manual_seed(1)
        y.backward(torch.randn(y.shape, generator=g).to(y.device, y.dtype))
        return {"y": y, "dx": x.grad, **{"d" + n: p.grad for n, p in block.named_parameters()},
                **dict(block.named_buffers())}

    ref = run(copy.deepcopy(block).double(), x.double(), False)
    eager = run_amp(copy.deepcopy(block), x, dtype, False)
    fused = run_amp(copy.deepcopy(block), x, dtype, True)
    for name in ref:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(fused[name], eager[name]), name
        else:
            helpers.assert_rule_composition(fused[name], eager[name], ref[name], name)


def saved_activation_bytes(fn, params):
    """Bytes of the distinct non-parameter storages autograd saves for backward while running fn."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saves_only_raw_conv_outputs():
    # Identity Bottleneck: eager keeps x, y1, relu(bn1), y2, relu(bn2), y3 and the output (for the
    # last ReLU): 4+1+1+1+1+4+4 = 16 units; the normconv path keeps x, y1, y2, y3 (identity is x):
    # 4+1+1+4 = 10 units = 0.625×, plus per-channel fp32 vectors.
    torch.manual_seed(0)
    eager = TVBottleneck(64, 16).to(DEV).to(memory_format=torch.channels_last)
    block = fastres.Bottleneck(64, 16).to(DEV).to(memory_format=torch.channels_last)
    block.load_state_dict(eager.state_dict())
    x = torch.randn(2, 64, 8, 8, device=DEV).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    params = list(eager.parameters()) + list(block.parameters())
    with fastres.use_backend("torch"):
        eager_bytes = saved_activation_bytes(lambda: eager(x), params)
    fused_bytes = saved_activation_bytes(lambda: block(x), params)
    assert eager_bytes >= 16 * 2 * 16 * 8 * 8 * 4
    assert fused_bytes <= 0.64 * eager_bytes, (fused_bytes, eager_bytes)


# --------------------------------------------------------------------------------------------------
# Issue 14: the residual BN's statistics come from the last conv's epilogue.


def make_identity_block(kind, dtype, seed=0):
    """A block without downsample (identity shortcut): stride 1, inplanes = planes · expansion."""
    torch.manual_seed(seed)
    cls = TVBottleneck if kind == "bottleneck" else TVBasicBlock
    planes = 4
    block = cls(planes * cls.expansion, planes)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.5)
    block = block.to(DEV).to(memory_format=torch.channels_last)
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            m.to(dtype)
    x = torch.randn(2, planes * cls.expansion, 5, 5, device=DEV).to(dtype)
    return block, x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind, dtype", [("bottleneck", torch.float16), ("basic", torch.float32)])
def test_identity_block_makes_no_statistics_pass(kind, dtype, monkeypatch):
    """Without downsample: every gradient exact under the rule, and the forward computes no batch
    statistics outside the conv epilogues (the BN-act backends' statistics pass never runs)."""
    from fastres.ops import batch_norm_act as bn_ops
    from fastres.triton import batch_norm_act as triton_bn

    block, x = make_identity_block(kind, dtype)
    ref, eager = eager_pair(block, x, True)
    stats_passes = []
    for module, names in ((triton_bn, ("batch_stats", "forward_train")),
                          (bn_ops.TorchBackend, ("batch_stats", "forward_train"))):
        for name in names:
            if hasattr(module, name):
                original = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *a, _f=original, **k:
                                    stats_passes.append(1) or _f(*a, **k))
    fused_block = copy.deepcopy(block)
    fused_block.train()
    xf = x.detach().clone().requires_grad_()
    assert normconv.block_uses_normconv(fused_block, xf)
    y = normconv._chain(fused_block, xf)
    assert stats_passes == []
    g = torch.Generator().manual_seed(1)
    y.backward(torch.randn(y.shape, generator=g).to(y.device, y.dtype))
    fused = {"y": y, "dx": xf.grad, **{"d" + n: p.grad for n, p in fused_block.named_parameters()},
             **dict(fused_block.named_buffers())}
    for name in ref:
        f, e, r = fused[name], eager[name], ref[name]
        if name.endswith("num_batches_tracked"):
            assert torch.equal(f, e), name
            continue
        helpers.assert_rule_composition(f, e.to(f.dtype), r, name)


def test_resnet50_step_autotune_count(monkeypatch):
    """What a CUDA device's autotuner does on the first ResNet-50 training step (bf16 autocast,
    every Bottleneck on the normconv path): distinct autotune keys, configs benchmarked and
    compiled variants, counted on CPU (the conv kernels are recorded, not run; the spatial size
    is not part of any key, so a 32×32 batch of 2 hits the keys of 224×224 at batch 256)."""
    import types

    import torchvision

    from fastres.triton import conv as tconv

    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, TVBottleneck):
            m.forward = types.MethodType(normconv.bottleneck_forward, m)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    # The convs take the Triton launchers (recorded), everything else the torch reference.
    from fastres.ops import norm_conv as nc_ops
    monkeypatch.setattr(nc_ops, "_backend_for", lambda x, groups, op: nc_ops.TritonBackend)
    with fastres.use_backend("torch"), tconv.recording_autotune() as records:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
    counts = tconv.autotune_summary(records)
    print("ResNet-50 step, bf16:", counts)
    assert counts["launches"] == 16 * 3 * 3 - 16 * 0  # 16 blocks × 3 convs × (fwd, dgrad, wgrad)
    assert counts["benchmark_runs"] < counts["benchmark_runs_unpruned"]
    assert counts["compiled_variants"] <= counts["compiled_variants_unpruned"]
