"""The tolerance rule itself (tests/helpers.py) must fail for realistic wrong results: each case
below takes a correct fused result (eager's own) and breaks it the way a bug would."""
import pytest
import torch

from helpers import assert_rule, make_case, run_three, ulp


def _bf16_case():
    x, kw = make_case((4, 8, 5, 5), torch.bfloat16, residual=False, seed=3)
    kw["weight"][2] = 0.05
    res = run_three(x, **kw, activation=None, fused_fn=None)
    return res


@pytest.fixture(scope="module")
def bf16():
    from fastres import use_backend
    with use_backend("torch"):
        return _bf16_case()


def test_correct_results_pass(bf16):
    for e, r in zip(bf16["eager"], bf16["ref"]):
        assert_rule(e.clone(), e, r, "eager against itself")


def test_zeroed_channel_with_small_weight_fails(bf16):
    y, e, r = bf16["fused"][0].clone(), bf16["eager"][0], bf16["ref"][0]
    y[:, 2] = 0  # the channel whose weight is 0.05
    with pytest.raises(AssertionError, match="fused error"):
        assert_rule(y, e, r, "y with channel 2 zeroed")


def test_every_element_moved_by_two_ulps_of_the_max_fails(bf16):
    e, r = bf16["eager"][0], bf16["ref"][0]
    step = 2 * ulp(r.abs().max().item(), e.dtype)
    with pytest.raises(AssertionError, match="fused error"):
        assert_rule((e.float() + step).to(e.dtype), e, r, "y + 2 ulps")


def test_one_wrong_channel_of_a_per_channel_vector_fails(bf16):
    dw, e, r = bf16["fused"][2].clone(), bf16["eager"][2], bf16["ref"][2]
    small = int(r.abs().argmin())
    dw[small] *= 1.01  # 1 % off on the smallest channel: far below the largest channel's error
    with pytest.raises(AssertionError, match=f"channel {small}"):
        assert_rule(dw, e, r, "dweight")


def test_nan_in_the_wrong_place_fails(bf16):
    y, e, r = bf16["fused"][0].clone(), bf16["eager"][0], bf16["ref"][0]
    y[0, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN positions"):
        assert_rule(y, e, r, "y with a NaN")


def test_floor_cannot_be_raised():
    t = torch.ones(3)
    with pytest.raises(AssertionError, match="never loosen"):
        assert_rule(t, t, t.double(), floor_ulps=2)


def test_a_wrong_channel_inside_a_model_fails_layer_by_layer(monkeypatch):
    """In a model, per-channel vectors are held as whole vectors (module_helpers.compare_models,
    per_channel=False), and a small error on one channel can hide under another channel's larger
    composition noise. check_layers runs each BN layer again on its own in-model inputs, channel
    by channel: a dweight 4 ulps off on one channel must fail there."""
    import torchvision

    import fastres
    import fastres.ops.batch_norm_act as ops
    from module_helpers import TEST_BACKEND, compare_models, make_inputs, randomize_bn

    class OneChannelOff:
        """The selected backend, with dweight[1] of every backward 4 ulps off."""

        def __init__(self, backend):
            self._backend = backend

        def __getattr__(self, name):
            return getattr(self._backend, name)

        def backward(self, *args, **kwargs):
            dx, dres, dweight, dbias = self._backend.backward(*args, **kwargs)
            if dweight is not None:
                dweight = dweight.clone()
                for _ in range(4):  # 4 ulps up
                    dweight[1] = torch.nextafter(dweight[1], torch.tensor(float("inf")))
            return dx, dres, dweight, dbias

    torch.manual_seed(0)
    model = randomize_bn(torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(), torchvision.models.resnet.BasicBlock(6, 6)))
    xs, gs = make_inputs((4, 3, 6, 6), 1, seed=50), make_inputs((4, 6, 6, 6), 1, seed=51)
    with fastres.use_backend(TEST_BACKEND):
        compare_models(fastres.convert(model), model, xs, gs, steps=1, what="correct",
                       per_channel=False)
        backend_for = ops._backend_for
        monkeypatch.setattr(ops, "_backend_for", lambda x, op: OneChannelOff(backend_for(x, op)))
        with pytest.raises(AssertionError, match=r"layer .*channel 1"):
            compare_models(fastres.convert(model), model, xs, gs, steps=1, what="one channel off",
                           per_channel=False)
