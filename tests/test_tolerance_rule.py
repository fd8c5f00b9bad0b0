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
