"""fastres.models: torchvision-identical state_dicts, torchvision checkpoints load strictly, and the
fused models compute what torchvision's do."""
import pytest
import torch

import fastres
from fastres import models
from module_helpers import (TEST_BACKEND, compare_models, compare_wiring_fp64, make_inputs,
                            randomize_bn)

torchvision = pytest.importorskip("torchvision")

NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "wide_resnet50_2"]


@pytest.fixture(autouse=True)
def backend():
    with fastres.use_backend(TEST_BACKEND):
        yield


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_match_torchvision(name):
    with torch.device("meta"):  # no allocation, no init cost
        ours = getattr(models, name)(num_classes=10)
        theirs = getattr(torchvision.models, name)(num_classes=10)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for key in ours_sd:
        assert ours_sd[key].shape == theirs_sd[key].shape, key
        assert ours_sd[key].dtype == theirs_sd[key].dtype, key


def test_no_torchvision_import():
    import subprocess
    import sys

    code = ("import sys, fastres; m = fastres.models.resnet18(); "
            "assert 'torchvision' not in sys.modules, 'fastres imported torchvision'")
    subprocess.run([sys.executable, "-c", code], check=True)


def tiny_pair(block_name, layers, **kw):
    torch.manual_seed(0)
    block_ours = getattr(fastres, block_name)
    block_tv = getattr(torchvision.models.resnet, block_name)
    theirs = torchvision.models.resnet.ResNet(block_tv, layers, num_classes=5, **kw)
    randomize_bn(theirs)
    ours = models.ResNet(block_ours, layers, num_classes=5, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


# N=8 at 16×16: every BN sees at least 8 values per channel (see test_convert.py).
SHAPE = (8, 3, 16, 16)


def test_tiny_resnet_matches_torchvision():
    """fp32 on the test backend (Triton kernels): a train step against torchvision (eval mode of
    the same modules: test_modules.py, and resnet18 in test_convert.py)."""
    xs, gs = make_inputs(SHAPE, 1, seed=30), make_inputs((SHAPE[0], 5), 1, seed=31)
    ours, theirs = tiny_pair("BasicBlock", [1, 1, 1, 1])
    compare_models(ours, theirs, xs, gs, steps=1, train=True, what="train", per_channel=False)


@pytest.mark.parametrize("block_name", ["BasicBlock", "Bottleneck"])
def test_resnet_wiring_matches_torchvision(block_name):
    """fp64 (torch backend): outputs, gradients, parameters and running stats after the steps."""
    steps = 2 if block_name == "BasicBlock" else 1
    xs, gs = make_inputs(SHAPE, steps, seed=33), make_inputs((SHAPE[0], 5), steps, seed=34)
    ours, theirs = tiny_pair(block_name, [1, 1, 1, 1])
    compare_wiring_fp64(ours, theirs, xs, gs, steps=steps, what=block_name)


def test_checkpoint_round_trip_strict():
    theirs = torchvision.models.resnet18(num_classes=7)
    ours = models.resnet18(num_classes=7)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs2 = torchvision.models.resnet18(num_classes=7)
    theirs2.load_state_dict(ours.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(v, theirs2.state_dict()[k]), k


def test_constructor_options_like_torchvision():
    m = models.resnet18(num_classes=3, zero_init_residual=True)
    assert m.fc.out_features == 3
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in m.modules()
               if isinstance(b, fastres.BasicBlock))
    m50 = models.resnet50(zero_init_residual=True, replace_stride_with_dilation=[False, True, True])
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in m50.modules()
               if isinstance(b, fastres.Bottleneck))
    assert m50.layer4[1].conv2.dilation == (4, 4)
    assert isinstance(m50.bn1, fastres.BatchNormAct2d) and m50.bn1.activation == "relu"
    assert m50.layer1[0].downsample[1].activation is None
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        models.resnet18(replace_stride_with_dilation=[True])
    with pytest.raises(ValueError, match="downloads no weights"):
        models.resnet18(weights="IMAGENET1K_V1")


def test_dilated_resnet_matches_torchvision():
    ours, theirs = tiny_pair("Bottleneck", [1, 1, 1, 1],
                             replace_stride_with_dilation=[False, False, True])
    ours.eval(), theirs.eval()
    x = make_inputs((1, 3, 32, 32), 1, seed=32)[0]
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
