"""torch.compile(fullgraph=True) over fastres: no graph break (fullgraph raises on one), in training
and evaluation, and results equal to eager fastres by the tolerance rule — compiled fp32 vs the fp64
reference (eager fastres in fp64 on the torch backend) must be within 2× eager fastres fp32's error.

Inductor compiles C++ on CPU, which is slow on a small machine, so the inductor test runs one
residual block; the whole converted ResNet-18 runs with backend="aot_eager", which still traces
through dynamo and AOTAutograd (fake tensors, functionalisation), i.e. proves there is no graph break.
The process-group (SyncBN) compile check lives in test_sync_batch_norm.py, in its gloo spawn.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastres
from helpers import assert_rule_composition


def basic_block(C):
    """fastres.BasicBlock with non-trivial BN parameters and running statistics."""
    block = fastres.BasicBlock(C, C)
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 1.5)
    return block


def run_step(model, x, grad_out):
    """Forward and backward; returns (output, input grad, parameter grads, buffers)."""
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(grad_out.to(y.dtype))
    grads = [p.grad.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers() if b.is_floating_point()]
    model.zero_grad(set_to_none=True)
    return [y.detach(), x.grad] + grads + buffers


def check_compiled(model, x, backend, train=True, channels_last=False, steps=2):
    """``steps`` forward+backward steps of the model compiled (fp32) and eager (fp32), both against
    eager fp64 on the torch backend, by the tolerance rule: outputs, input and parameter grads, and
    the running statistics after each step."""
    torch._dynamo.reset()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        out_shape = copy.deepcopy(model).eval()(x).shape
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ("ref", "eager", "compiled"):
        m = copy.deepcopy(model).train(train).to(memory_format=fmt)
        if name == "ref":
            m = m.double()
        fn = torch.compile(m, fullgraph=True, backend=backend) if name == "compiled" else m
        xx = x.double() if name == "ref" else x
        with fastres.use_backend("torch" if name == "ref" else fastres.get_backend()):
            results[name] = [run_step(fn, xx, grad_out) for _ in range(steps)]
    for step in range(steps):
        trio = zip(results["compiled"][step], results["eager"][step], results["ref"][step])
        for i, (c, e, r) in enumerate(trio):
            assert_rule_composition(c, e.to(c.dtype), r, name=f"step {step} item {i}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_inductor(train):
    torch.manual_seed(0)
    block = basic_block(4)
    x = torch.randn(2, 4, 5, 5)
    check_compiled(block, x, "inductor", train=train, channels_last=True)



@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet18_converted_aot_eager(train):
    """The whole converted ResNet-18 traces in one graph (fullgraph raises on any break)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = fastres.convert(torchvision.models.resnet18(num_classes=10))
    assert sum(isinstance(m, fastres.BatchNormAct2d) for m in model.modules()) == 20
    check_compiled(model, torch.randn(2, 3, 32, 32), "aot_eager", train=train,
                   channels_last=True, steps=1)


def test_fastres_resnet18_explain_no_graph_break():
    """fastres.models.resnet18 in training: torch._dynamo.explain counts one graph, no breaks."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = fastres.models.resnet18(num_classes=10).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
