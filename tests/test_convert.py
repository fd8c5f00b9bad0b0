"""fastres.convert on torchvision and timm ResNets, and fastres.fold_bn: converted vs original
(outputs, every gradient, running stats, state_dict keys), sharing, the report, what is left."""
import copy
import logging

import pytest
import torch
from torch import nn

import fastres
from fastres import BatchNormAct2d
from fastres.nn import ResidualAct
from module_helpers import (TEST_BACKEND, assert_rule, compare_models, compare_wiring_fp64,
                            make_inputs, randomize_bn)

torchvision = pytest.importorskip("torchvision")

# N=8 at 16×16: every BN of a ResNet sees at least 8 values per channel. (With 2 values per channel,
# as layer4 gets from a 2×3×32×32 input, BN amplifies input rounding ~100×, and whether the fused or
# the eager error is larger is a coin flip.)
SHAPE = (8, 3, 16, 16)


@pytest.fixture(autouse=True)
def backend():
    with fastres.use_backend(TEST_BACKEND):
        yield


def data(model, steps, shape=SHAPE):
    xs = make_inputs(shape, steps, seed=40)
    with torch.no_grad():
        out_shape = copy.deepcopy(model).eval()(xs[0][:2]).shape[1:]
    return xs, make_inputs((shape[0], *out_shape), steps, seed=41)


def check_converted(model, converted, steps=1, train=True, what=""):
    """The rule in fp32 on the test backend (Triton kernels)."""
    assert list(converted.state_dict()) == list(model.state_dict())
    xs, gs = data(model, steps)
    return compare_models(converted, model, xs, gs, steps=steps, train=train, what=what,
                          per_channel=False)


def check_wiring(model, converted, steps=3, train=True, shape=SHAPE, what=""):
    """fp64, torch backend: outputs, every gradient, parameters and running stats after three
    optimizer steps equal the original's (to 1e-6)."""
    assert list(converted.state_dict()) == list(model.state_dict())
    xs, gs = data(model, steps, shape)
    return compare_wiring_fp64(converted, model, xs, gs, steps=steps, train=train, what=what)


class NoGrad(nn.Module):
    """Train-mode forward only (outputs and running stats): the deep nets' gradients are compared
    exactly in fp64 (check_wiring); in fp32 a ResNet-50's stem gradients are already 4% off fp64
    in eager, dominated by ReLU-mask ties, which makes the 2× rule a coin flip there."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.no_grad():
            return self.model(x.detach()).requires_grad_()


def count(model, cls):
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_converted_matches_original(name):
    torch.manual_seed(0)
    # Running means of O(1) (randomize_bn), as in the foundation's tests: the rule's floor scales
    # with the reference value, and eager on CPU accumulates BN statistics in float64.
    model = randomize_bn(getattr(torchvision.models, name)(num_classes=10))
    converted, report = fastres.convert(model, return_report=True)
    block = fastres.BasicBlock if name == "resnet18" else fastres.Bottleneck
    assert count(converted, block) == (8 if name == "resnet18" else 16)
    assert count(converted, nn.BatchNorm2d) == 0 and report.left == []
    assert isinstance(converted.bn1, BatchNormAct2d) and isinstance(converted.relu, nn.Identity)
    assert count(model, BatchNormAct2d) == 0  # inplace=False left the original alone
    steps = 2 if name == "resnet18" else 1  # (three optimizer steps: per module, test_modules.py)
    f, _ = check_wiring(model, converted, steps=steps, what=name)
    assert int(f["final.layer1.0.bn1.num_batches_tracked"]) == steps
    if name == "resnet18":  # fp32, Triton kernels: output, all gradients, running stats
        check_converted(model, converted, what=name)
    else:  # fp32, Triton kernels: train-mode output and running stats
        check_converted(NoGrad(model), NoGrad(converted), what=name)


def test_torchvision_eval_and_fold_bn():
    torch.manual_seed(1)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    converted = fastres.convert(model)
    # Eval mode (running statistics folded into scale/shift on the fly) against the original, and
    # fold_bn: inference-only copy, every BN folded into its conv, same eval output (the rule).
    x = make_inputs(SHAPE, 1, seed=42)[0]
    ref_out = copy.deepcopy(model).double().eval()(x.double())
    with torch.no_grad():
        eager_out = model.eval()(x)
        assert_rule(converted.eval()(x), eager_out, ref_out, name="eval")
    for source in (converted, model):
        folded = fastres.fold_bn(source)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
        assert all(m.bias is not None for m in folded.modules() if isinstance(m, nn.Conv2d))
        assert not folded.training and not any(p.requires_grad for p in folded.parameters())
        with torch.no_grad():
            assert_rule(folded(x), eager_out.detach(), ref_out.detach(), name="fold_bn")
    assert count(converted, BatchNormAct2d) == 20  # the source is untouched
    assert count(fastres.fold_bn(converted), ResidualAct) == 20


def test_convert_shares_parameters_and_buffers():
    with fastres.use_backend("torch"):  # about sharing, not numerics
        check_sharing()


def check_sharing():
    model = torchvision.models.resnet18(num_classes=4)
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    same = fastres.convert(model, inplace=True)
    assert same is model
    after = same.state_dict(keep_vars=True)
    assert list(after) == list(tensors)
    assert all(after[k] is tensors[k] for k in tensors)  # the same objects: no copies
    assert isinstance(model.layer1[0], fastres.BasicBlock)
    # An optimizer built before the conversion still trains the converted model.
    before = model.fc.weight.detach().clone()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.fc.weight)
    # inplace=False: a converted copy, the original intact.
    original = torchvision.models.resnet18(num_classes=4)
    copy_ = fastres.convert(original)
    assert copy_ is not original
    assert type(original.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert copy_.layer1[0].bn1.weight is not original.layer1[0].bn1.weight
    # Converting twice changes nothing more.
    again, report = fastres.convert(copy_, return_report=True)
    assert report.converted == [] and report.left == []


def test_report_and_logging(caplog):
    model = nn.Sequential(
        torchvision.ops.Conv2dNormActivation(3, 4, 3),                      # converted (BN, ReLU)
        torchvision.ops.Conv2dNormActivation(4, 4, 3, activation_layer=nn.ReLU6),  # ReLU6: left
        nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4),                 # no ReLU: left
        torchvision.models.resnet.BasicBlock(4, 4),
    )
    model[4].register_forward_hook(lambda *a: None)                        # hooks: left
    randomize_bn(model)
    with caplog.at_level(logging.INFO, logger="fastres"):
        converted, report = fastres.convert(model, return_report=True)
    assert "fastres.convert" in caplog.text
    assert [name for name, _, _ in report.converted] == ["0.1"]
    left = {name: why for name, _, why in report.left}
    assert "ReLU6" in left["1.1"] and "no ReLU follows" in left["3"]
    assert "hooks" in left["4"] and "hooks" in left["4.bn1"]
    assert isinstance(converted[0][1], BatchNormAct2d) and isinstance(converted[0][2], nn.Identity)
    assert type(converted[4]) is torchvision.models.resnet.BasicBlock
    assert "converted 0.1" in str(report)
    xs, gs = make_inputs((4, 3, 6, 6), 1, seed=43), make_inputs((4, 4, 6, 6), 1, seed=44)
    compare_models(converted, model, xs, gs, steps=1, what="sequential", per_channel=False)


def test_non_standard_blocks_are_left_or_partly_fused():
    class MyBlock(torchvision.models.resnet.BasicBlock):  # a subclass may have its own forward
        def forward(self, x):
            return super().forward(x) * 2

    sync = torchvision.models.resnet.BasicBlock(4, 4, norm_layer=nn.SyncBatchNorm)
    gn = torchvision.models.resnet.BasicBlock(4, 4, norm_layer=lambda c: nn.GroupNorm(2, c))
    model = nn.Sequential(MyBlock(4, 4), sync, gn)
    converted, report = fastres.convert(model, return_report=True)
    assert type(converted[0]) is MyBlock and type(converted[1]) is type(sync)
    assert type(converted[2]) is type(gn)
    left = {name: why for name, _, why in report.left}
    assert "subclass" in left["0"] and "SyncBatchNorm" in left["1"] and "GroupNorm" in left["2"]


# --------------------------------------------------------------------------------------------------
# timm


def timm_resnet(**kw):
    timm_resnet_mod = pytest.importorskip("timm.models.resnet")
    torch.manual_seed(0)
    kw.setdefault("block", timm_resnet_mod.BasicBlock)
    kw.setdefault("layers", [1, 1, 1, 1])
    kw.setdefault("channels", (8, 16, 32, 64))  # narrow: quick
    return randomize_bn(timm_resnet_mod.ResNet(num_classes=6, **kw))  # (timm zero-inits last BNs)


def test_timm_resnet18_converted_matches_original():
    timm = pytest.importorskip("timm")
    model = randomize_bn(timm.create_model("resnet18", num_classes=6))
    converted, report = fastres.convert(model, return_report=True)
    assert report.left == [] and count(converted, fastres.nn.TimmBasicBlock) == 8
    assert isinstance(converted.bn1, BatchNormAct2d) and isinstance(converted.act1, nn.Identity)
    check_wiring(model, converted, steps=1, what="timm resnet18")
    check_converted(NoGrad(model), NoGrad(converted), what="timm resnet18")


def test_timm_variants():
    timm_resnet_mod = pytest.importorskip("timm.models.resnet")
    from timm.layers import BlurPool2d

    # resnet50d-like: deep stem (Sequential conv-BN-ReLU) + average-pool downsample; anti-aliasing.
    model = timm_resnet(block=timm_resnet_mod.Bottleneck, stem_type="deep", stem_width=8,
                        avg_down=True, aa_layer=BlurPool2d)
    converted, report = fastres.convert(model, return_report=True)
    assert report.left == [] and count(converted, fastres.nn.TimmBottleneck) == 4
    assert isinstance(converted.conv1[1], BatchNormAct2d) and isinstance(converted.conv1[2],
                                                                         nn.Identity)
    check_wiring(model, converted, shape=(4, 3, 32, 32), what="timm deep stem + aa")
    folded = fastres.fold_bn(converted)
    x = make_inputs((4, 3, 32, 32), 1, seed=45)[0]
    with torch.no_grad():
        assert_rule(folded(x), model.eval()(x), copy.deepcopy(model).double()(x.double()),
                    name="timm fold_bn")


def test_timm_partial_patterns():
    # Squeeze-excitation between bn2 and the add: bn1+act1 fused, the tail left as timm runs it.
    model = timm_resnet(block_args=dict(attn_layer="se"))
    converted, report = fastres.convert(model, return_report=True)
    block = converted.layer1[0]
    assert isinstance(block, fastres.nn.TimmBasicBlock)
    assert block.fused_head and not block.fused_tail and type(block.bn2) is nn.BatchNorm2d
    assert any("attention" in why for _, _, why in report.left)
    check_wiring(model, converted, what="timm se")
    # drop_path and drop_block: nothing fusable in the block -> left, still correct in eval.
    model = timm_resnet(drop_path_rate=0.1, drop_block_rate=0.1, layers=[1, 1, 2, 2])
    converted, report = fastres.convert(model, return_report=True)
    left = {name: why for name, _, why in report.left}
    assert "drop_block" in left["layer3.0"] and "drop_path" in left["layer3.0"]
    assert type(converted.layer3[0]).__module__ == "timm.models.resnet"
    check_wiring(model, converted, steps=1, train=False, what="timm drop_path eval")
    # A non-ReLU activation is left alone.
    model = timm_resnet(act_layer=nn.SiLU)
    converted, report = fastres.convert(model, return_report=True)
    assert count(converted, BatchNormAct2d) == 0 or all(
        m.activation is None for m in converted.modules() if isinstance(m, BatchNormAct2d))
    assert any("SiLU" in why for _, _, why in report.left)
