"""BatchNormAct2d, ConvBNAct2d, BasicBlock and Bottleneck against their torch.nn / torchvision
twins: outputs, gradients of the input and every parameter, running stats after three optimizer
steps."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fastres
from fastres import BatchNormAct2d, BasicBlock, Bottleneck, ConvBNAct2d
from module_helpers import TEST_BACKEND, compare_models, make_inputs, randomize_bn

torchvision = pytest.importorskip("torchvision")
from torchvision.models import resnet as tv_resnet  # noqa: E402
from torchvision.ops import Conv2dNormActivation  # noqa: E402


@pytest.fixture(autouse=True)
def backend():
    with fastres.use_backend(TEST_BACKEND):
        yield


class EagerBNAct(nn.Module):
    """act(BatchNorm2d(x) + residual) in plain torch: BatchNormAct2d's twin (same keys)."""

    def __init__(self, bn, activation):
        super().__init__()
        self.bn, self.activation = bn, activation

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.activation == "relu" else y


class FusedWrap(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x, residual=None):
        return self.bn(x, residual)


def bn_pair(C, activation="relu", **kw):
    eager = nn.BatchNorm2d(C, **kw)
    randomize_bn(eager)
    fused = BatchNormAct2d(C, activation=activation, **kw)
    fused.load_state_dict(eager.state_dict())
    return FusedWrap(fused), EagerBNAct(eager, activation)


SHAPE = (3, 4, 5, 6)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("activation,residual", [("relu", True), ("relu", False), (None, False)])
def test_batch_norm_act2d_matches_batch_norm(train, activation, residual, precision_mode):
    fused, eager = bn_pair(SHAPE[1], activation)
    initial_mean = eager.bn.running_mean.clone()
    steps = 3 if train else 1
    xs = make_inputs(SHAPE, steps, seed=1, offset=1.0)
    rs = make_inputs(SHAPE, steps, seed=2) if residual else None
    gs = make_inputs(SHAPE, steps, seed=3)
    f, e, _ = compare_models(fused, eager, xs, gs, steps=steps, train=train, residuals=rs,
                             what=f"train={train} act={activation}")
    if train:
        assert int(f["final.bn.num_batches_tracked"]) == 3
        # the three steps really moved the running stats (and eval mode leaves them alone)
        assert (f["final.bn.running_mean"] - initial_mean).abs().min() > 1e-3
    else:
        assert torch.equal(f["final.bn.running_mean"], initial_mean)


@pytest.mark.parametrize("kw", [dict(momentum=None), dict(affine=False),
                                dict(track_running_stats=False), dict(eps=1e-3, momentum=0.3)],
                         ids=["momentum_none", "affine_false", "no_running_stats", "eps_momentum"])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_act2d_options(kw, train, precision_mode):
    fused, eager = bn_pair(SHAPE[1], "relu", **kw)
    steps = 3 if train else 1
    xs, rs, gs = (make_inputs(SHAPE, steps, seed=s, offset=1.0) for s in (4, 5, 6))
    compare_models(fused, eager, xs, gs, steps=steps, train=train, residuals=rs, what=str(kw))
    assert fused.bn.state_dict().keys() == eager.bn.state_dict().keys()


def test_batch_norm_act2d_channels_last_and_noncontiguous(precision_mode):
    fused, eager = bn_pair(SHAPE[1], "relu")
    xs = make_inputs(SHAPE, 3, seed=7, channels_last=True, offset=1.0)
    rs = [r.transpose(2, 3).contiguous().transpose(2, 3) for r in make_inputs(SHAPE, 3, seed=8)]
    gs = make_inputs(SHAPE, 3, seed=9)
    f, _, _ = compare_models(fused, eager, xs, gs, residuals=rs, what="channels_last")


def test_batch_norm_act2d_is_a_batch_norm():
    bn = BatchNormAct2d(8)
    ref = nn.BatchNorm2d(8)
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.state_dict().keys() == ref.state_dict().keys()
    assert [n for n, _ in bn.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert bn.activation == "relu" and BatchNormAct2d(8, activation="none").activation is None
    bias_free = BatchNormAct2d(8, bias=False)
    assert bias_free.bias is None and bias_free.weight is not None
    # torch's momentum=None reads: cumulative moving average over num_batches_tracked.
    fused = BatchNormAct2d(4, momentum=None, activation=None).train()
    eager = nn.BatchNorm2d(4, momentum=None).train()
    for seed in range(3):
        x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(seed))
        fused(x), eager(x)
    torch.testing.assert_close(fused.running_mean, eager.running_mean)
    torch.testing.assert_close(fused.running_var, eager.running_var)
    assert int(fused.num_batches_tracked) == 3


def test_batch_norm_act2d_errors():
    bn = BatchNormAct2d(4)
    with pytest.raises(ValueError, match="4-D input"):
        bn(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="4 .*3 channels|got input with 3 channels"):
        bn(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="residual shape"):
        bn(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 4))
    with pytest.raises(ValueError, match="activation must be"):
        BatchNormAct2d(4, activation="gelu")
    no_params = BatchNormAct2d(4, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match="3 channels"):
        no_params(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError):
        bn("not a tensor")


def test_conv_bn_act_matches_torchvision():
    tv = Conv2dNormActivation(3, 6, kernel_size=3, stride=2)
    randomize_bn(tv)
    ours = ConvBNAct2d(3, 6, kernel_size=3, stride=2, padding=1)
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)  # and back
    xs, gs = make_inputs((2, 3, 8, 8), 3, seed=10), make_inputs((2, 6, 4, 4), 3, seed=11)
    compare_models(ours, tv, xs, gs, what="ConvBNAct2d train")
    ours.load_state_dict(tv.state_dict())  # eval starts from the same trained parameters
    compare_models(ours, tv, xs, gs, steps=1, train=False, what="ConvBNAct2d eval")
    auto = ConvBNAct2d(3, 6, 3, padding=None, dilation=2)
    assert auto[0].padding == (2, 2)
    plain = ConvBNAct2d(3, 6, 1, activation=None)
    assert plain[1].activation is None


def block_pair(kind, inplanes, planes, stride, groups=1, base_width=64, seed=0):
    torch.manual_seed(seed)
    tv_block = getattr(tv_resnet, kind)
    ours_block = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}[kind]
    downsample = None
    if stride != 1 or inplanes != planes * tv_block.expansion:
        downsample = nn.Sequential(tv_resnet.conv1x1(inplanes, planes * tv_block.expansion, stride),
                                   nn.BatchNorm2d(planes * tv_block.expansion))
    eager = tv_block(inplanes, planes, stride, downsample, groups, base_width)
    randomize_bn(eager, seed)
    fused_down = None
    if downsample is not None:
        fused_down = nn.Sequential(tv_resnet.conv1x1(inplanes, planes * tv_block.expansion, stride),
                                   BatchNormAct2d(planes * tv_block.expansion, activation=None))
    fused = ours_block(inplanes, planes, stride, fused_down, groups, base_width)
    assert list(fused.state_dict()) == list(eager.state_dict())
    fused.load_state_dict(eager.state_dict(), strict=True)
    return fused, eager


@pytest.mark.parametrize("kind,inplanes,planes,stride,groups,base_width", [
    ("BasicBlock", 4, 4, 1, 1, 64),
    ("BasicBlock", 4, 8, 2, 1, 64),
    ("Bottleneck", 8, 2, 1, 1, 64),
    ("Bottleneck", 4, 4, 2, 2, 64),
])
@pytest.mark.parametrize("train", [True, False])
def test_blocks_match_torchvision(kind, inplanes, planes, stride, groups, base_width, train,
                                  precision_mode):
    fused, eager = block_pair(kind, inplanes, planes, stride, groups, base_width)
    out_planes = planes * fused.expansion
    steps = 3 if train else 1
    xs = make_inputs((2, inplanes, 6, 6), steps, seed=12)
    gs = make_inputs((2, out_planes, 6 // stride, 6 // stride), steps, seed=13)
    compare_models(fused, eager, xs, gs, steps=steps, train=train, what=f"{kind} train={train}")


def test_blocks_constructor_like_torchvision():
    assert BasicBlock.expansion == 1 and Bottleneck.expansion == 4
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        BasicBlock(4, 4, groups=2)
    with pytest.raises(NotImplementedError):
        BasicBlock(4, 4, dilation=2)
    b = Bottleneck(8, 2)
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"):
        assert hasattr(b, name)
    assert isinstance(b.bn3, BatchNormAct2d) and b.bn3.activation == "relu"
    # A plain norm layer still works (unfused), with torchvision's results.
    eager = tv_resnet.BasicBlock(4, 4)
    plain = BasicBlock(4, 4, norm_layer=nn.BatchNorm2d)
    plain.load_state_dict(eager.state_dict())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(plain(x), eager(x))


def test_state_dict_round_trip_both_ways():
    fused, eager = block_pair("Bottleneck", 4, 4, 2)
    x = torch.randn(2, 4, 6, 6)
    fused.train()(x)  # move running stats and num_batches_tracked
    eager2 = copy.deepcopy(eager)
    eager2.load_state_dict(fused.state_dict(), strict=True)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, eager2.state_dict()[k]), k
    fused2 = copy.deepcopy(fused)
    fused2.load_state_dict(eager2.state_dict(), strict=True)
    fused.eval(), fused2.eval()
    assert torch.equal(fused(x), fused2(x))


def test_repr_deepcopy_pickle():
    fused, _ = block_pair("BasicBlock", 4, 8, 2)
    text = repr(fused)
    assert "BatchNormAct2d(8" in text and "activation='relu'" in text and "activation=None" in text
    fused.eval()
    x = torch.randn(2, 4, 6, 6)
    y = fused(x)
    clone = copy.deepcopy(fused)
    assert torch.equal(clone(x), y)
    assert clone.bn1.weight is not fused.bn1.weight
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), y)
    unpickled = pickle.loads(pickle.dumps(fused))
    assert torch.equal(unpickled(x), y) and unpickled.bn2.activation == "relu"
    conv = ConvBNAct2d(3, 4, 3)
    assert "BatchNormAct2d" in repr(conv)
    assert type(pickle.loads(pickle.dumps(conv))) is ConvBNAct2d


def test_channels_last_module(precision_mode):
    fused, eager = block_pair("BasicBlock", 4, 8, 2)
    fused = fused.to(memory_format=torch.channels_last)
    eager = eager.to(memory_format=torch.channels_last)
    xs = make_inputs((2, 4, 6, 6), 3, seed=14, channels_last=True)
    gs = make_inputs((2, 8, 3, 3), 3, seed=15)
    f, _, _ = compare_models(fused, eager, xs, gs, what="channels_last")
    assert f["step0.output"].is_contiguous(memory_format=torch.channels_last)


# One step: several SGD steps in fp16/bf16 diverge chaotically from the fp64 reference, eager too.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16(dtype, precision_mode):
    fused, eager = block_pair("Bottleneck", 4, 2, 2)
    xs = make_inputs((2, 4, 6, 6), 1, seed=16)
    gs = make_inputs((2, 8, 3, 3), 1, seed=17)
    f, _, _ = compare_models(fused, eager, xs, gs, steps=1, dtype=dtype, what=str(dtype))
    assert f["step0.output"].dtype == dtype
    assert fused.bn1.weight.dtype == dtype


# In bf16 a block output whose pre-activation is within eager's error of 0 can flip the ReLU mask
# between eager (which rounds the BN output to bf16 before adding the identity) and the fused op
# (one rounding). compare_models zeroes the gradient at such ties in every model
# (module_helpers.run_lockstep), so any seed works: 18/19 have one such tie.
def test_autocast_bfloat16_cpu(precision_mode):
    fused, eager = block_pair("BasicBlock", 4, 8, 2)
    xs = make_inputs((2, 4, 6, 6), 1, seed=18)
    gs = make_inputs((2, 8, 3, 3), 1, seed=19)
    f, e, _ = compare_models(fused, eager, xs, gs, steps=1, autocast=True, what="autocast")
    assert f["step0.output"].dtype == e["step0.output"].dtype == torch.bfloat16
    assert fused.bn1.weight.dtype == torch.float32


def test_momentum_none_reads_no_count_on_the_host(monkeypatch):
    """The cumulative average's factor 1/num_batches_tracked stays a device tensor (no host sync:
    capturable in a CUDA graph), and the running stats still match nn.BatchNorm2d."""
    fused, eager = BatchNormAct2d(3, momentum=None, activation=None), nn.BatchNorm2d(3, momentum=None)
    xs = [torch.randn(4, 3, 5, 5) + i for i in range(3)]
    for x in xs:
        eager(x)
    with monkeypatch.context() as m:
        for name in ("__float__", "item", "tolist"):
            m.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host read of a tensor"))
        for x in xs:
            fused(x)
    torch.testing.assert_close(fused.running_mean, eager.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.running_var, eager.running_var, rtol=1e-6, atol=1e-7)
    assert int(fused.num_batches_tracked) == 3
