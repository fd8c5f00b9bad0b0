"""fastres.memory (bytes saved for backward, counted on fake CUDA tensors) and the memory changes it
measures: BatchNormAct2d.mask_from_output and fastres.nn.MaxPool2d (same results as eager, bit for
bit), and ResNet-50's ratios against eager at batch 2, 64x64."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastres
from fastres import functional as F
from fastres.memory import INPUT, saved_activation_bytes
from fastres.nn import MaxPool2d


def test_counts_a_toy_model_exactly():
    # conv (no bias) saves its input x; BN saves its input y (the conv output) and fp32 mean and
    # invstd ([C] each; cuDNN's reserve is 0 bytes); the in-place ReLU saves its output, whose
    # storage the max-pool saves again (counted once) with int64 indices. Parameters and running
    # statistics are not counted.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2))
    r = saved_activation_bytes(model, (2, 3, 10, 10))
    x, y, stats, idx = 2 * 3 * 10 * 10 * 4, 2 * 8 * 8 * 8 * 4, 2 * 8 * 4, 2 * 8 * 4 * 4 * 8
    assert r.by_unit == {INPUT: x, "0": y, "1": y + stats, "3": idx}
    assert r.activation_bytes == x + 2 * y + stats + idx
    assert r.parameter_copy_bytes == 0
    assert r.saved_tensors == 7  # x, y, mean, invstd, the (empty) reserve, relu output, indices
    # bf16 autocast: the conv saves its bf16 casts of x and of the weight (a parameter copy).
    r = saved_activation_bytes(model, (2, 3, 10, 10), torch.bfloat16)
    assert r.parameter_copy_bytes == 8 * 3 * 3 * 3 * 2
    assert r.by_unit == {"0": x // 2 + y // 2, "1": y // 2 + stats, "3": idx}


def test_fastres_ops_run_their_fake_kernels_and_are_counted():
    # BatchNormAct2d with a residual and ReLU saves x and the residual (+ fp32 mean, var); with
    # mask_from_output it saves x and the output instead.
    class Tail(nn.Module):
        def __init__(self, flag):
            super().__init__()
            self.bn = fastres.BatchNormAct2d(4)
            self.bn.mask_from_output = flag
            self.down = fastres.BatchNormAct2d(4, activation=None)

        def forward(self, x):
            return self.bn(x, self.down(x * 2))

    shape, c = (2, 4, 6, 6), 4 * 4
    n = 2 * 4 * 6 * 6 * 4
    for flag in (False, True):
        r = saved_activation_bytes(Tail(flag), shape)
        # down saves x*2 (+stats); bn saves x (the input), the residual or its output (+stats)
        assert r.activation_bytes == 3 * n + 2 * 2 * c, flag
        unit = "bn" if flag else "down"
        assert r.by_unit[unit] == n + 2 * c, (flag, r.by_unit)


def test_storage_saved_twice_counted_once():
    class TwoSaves(nn.Module):
        def forward(self, x):
            y = x.exp()  # exp saves its output
            return (y * y).sum()  # mul saves both operands: the same storage

    r = saved_activation_bytes(TwoSaves(), (4, 5), input_requires_grad=True)
    assert r.activation_bytes == 4 * 5 * 4 and r.saved_tensors == 1


@pytest.mark.parametrize("residual", [False, True])
def test_mask_from_output_gives_the_same_gradients(residual):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float32)
    x[0, 0, 0, :2] = float("nan")
    res = torch.randn_like(x)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    dy = torch.randn_like(x)
    outs = []
    for flag in (False, True):
        xs, rs = x.clone().requires_grad_(), res.clone().requires_grad_()
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = F.batch_norm_act(xs, None, None, ws, bs, True, 0.1, 1e-5,
                             residual=rs if residual else None, activation="relu",
                             mask_from_output=flag)
        y.backward(dy)
        outs.append([y, xs.grad, ws.grad, bs.grad] + ([rs.grad] if residual else []))
    for a, b_ in zip(*outs):
        assert torch.equal(a.nan_to_num(7.0), b_.nan_to_num(7.0))


def test_max_pool_without_indices_matches_eager():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9).round()  # ties: the argmax must be eager's
    x[0, 0, 0, 0] = float("nan")
    dy = torch.randn(2, 3, 5, 5)
    grads = []
    for pool in (nn.MaxPool2d(3, 2, 1), MaxPool2d(3, 2, 1)):
        xs = x.clone().requires_grad_()
        y = pool(xs)
        y.backward(dy)
        grads.append((y, xs.grad))
    assert torch.equal(grads[0][0].nan_to_num(7.0), grads[1][0].nan_to_num(7.0))
    assert torch.equal(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match="indices"):
        MaxPool2d(2, return_indices=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resnet50_ratios_meet_the_targets(resnet50_counts, dtype):
    eager = resnet50_counts[dtype, "eager"].activation_bytes
    default = resnet50_counts[dtype, "default"].activation_bytes
    normconv_ = resnet50_counts[dtype, "normconv"].activation_bytes
    assert default <= 1.0 * eager, default / eager
    assert normconv_ <= 0.85 * eager, normconv_ / eager
    # Every block of the default path keeps at most what eager's keeps (the last one less: no
    # ReLU keeps the model's last block output).
    for unit, nbytes in resnet50_counts[dtype, "default"].by_unit.items():
        assert nbytes <= resnet50_counts[dtype, "eager"].by_unit[unit], unit
