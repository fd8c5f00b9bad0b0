"""Eager's errors for the two argument cases where fastres used to return a result instead.

- eps: F.batch_norm raises ValueError("batch_norm eps must be positive during training, but got
  ...") for eps <= 0 when the batch statistics are used, and ("... must be non-negative ...") for
  eps < 0 otherwise; eps = 0 in evaluation is allowed (and divides by the running variance as is).
  fastres raises the same exception with the same message, functional and module alike.
- SyncBN whose whole process group holds one value per channel: the unbiased running variance is
  0/0. nn.SyncBatchNorm raises only for one value on a single rank (its Python check covers
  world_size < 2; on more ranks its CUDA kernel writes NaN into running_var); fastres raises the
  same "Expected more than 1 value per channel when training" ValueError on every rank, before the
  running statistics are touched, with a host read only on ranks holding 0 or 1 values.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres.functional import batch_norm_act, bn_fold, bn_fold_train, sync_batch_norm_act
import sync_checks
from helpers import assert_rule, eager_batch_norm_act

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not fastres.backend.triton_interpreting(),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))]


def _eager_error(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


def _case(C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, 3, 3, generator=g)
    return x, torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5, \
        torch.randn(C, generator=g), torch.randn(C, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, -1e-5], ids=["zero", "negative"])
@pytest.mark.parametrize("stats", [True, False], ids=["tracked", "untracked"])
def test_training_eps_must_be_positive(backend, eps, stats):
    x, rm, rv, w, b = _case()
    rm, rv = (rm, rv) if stats else (None, None)
    expected = _eager_error(lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, eps))
    rm0 = None if rm is None else rm.clone()
    with fastres.use_backend(backend), pytest.raises(ValueError) as info:
        batch_norm_act(x, rm, rv, w, b, training=True, eps=eps, residual=torch.randn_like(x))
    assert str(info.value) == expected
    if rm is not None:
        assert torch.equal(rm, rm0)  # raised before the running statistics were touched


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_eps_negative_raises_and_zero_matches_eager(backend):
    x, rm, rv, w, b = _case()
    expected = _eager_error(lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, -1e-5))
    with fastres.use_backend(backend):
        with pytest.raises(ValueError) as info:
            batch_norm_act(x, rm, rv, w, b, training=False, eps=-1e-5)
        assert str(info.value) == expected
        # eps = 0 in evaluation is valid (a zero running variance then divides by zero: eager's
        # CPU kernel, x·α + β, gives NaN where (x − mean)·invstd gives ±Inf; not compared here).
        fused = batch_norm_act(x, rm, rv, w, b, training=False, eps=0.0, activation="relu")
    eager = eager_batch_norm_act(x, rm, rv, w, b, False, 0.1, 0.0, None, "relu")
    ref = eager_batch_norm_act(x.double(), rm.double(), rv.double(), w.double(), b.double(), False,
                               0.1, 0.0, None, "relu")
    assert_rule(fused, eager, ref, name="eval eps=0")


@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
def test_module_eps_zero_raises_like_batch_norm_2d(track):
    """Training, and evaluation without running statistics (batch statistics again), raise;
    evaluation with running statistics runs."""
    x = torch.randn(2, 3, 3, 3)
    eager = torch.nn.BatchNorm2d(3, eps=0.0, track_running_stats=track)
    fused = fastres.BatchNormAct2d(3, eps=0.0, track_running_stats=track, activation=None)
    fused.load_state_dict(eager.state_dict())
    for mode in ("train", "eval"):
        getattr(eager, mode)()
        getattr(fused, mode)()
        if mode == "train" or not track:
            expected = _eager_error(lambda: eager(x))
            with pytest.raises(ValueError) as info:
                fused(x)
            assert str(info.value) == expected
        else:
            torch.testing.assert_close(fused(x), eager(x))


def test_sync_fallback_and_bn_fold_check_eps():
    x, rm, rv, w, b = _case()
    with pytest.raises(ValueError, match="eps must be positive during training"):
        sync_batch_norm_act(x, rm, rv, w, b, 0.1, 0.0)  # no process group: local training BN
    with pytest.raises(ValueError, match="eps must be positive during training"):
        bn_fold_train(rm, rv, 18, None, None, w, b, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bn_fold(rm, rv, w, b, eps=-1.0)
    bn_fold(rm, rv, w, b, eps=0.0)  # evaluation fold: allowed


# --------------------------------------------------------------------------------------------------
# Two processes (gloo): tests/sync_checks.py runs every case in one spawn and reports what raised.


@pytest.fixture(scope="module")
def sync_errors():
    return sync_checks.results()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["global_one_value", "global_one_value_other_rank"])
def test_sync_global_count_one_raises_on_every_rank(sync_errors, backend, name):
    for rank, result in enumerate(sync_errors):
        message, rm, rv = result[(backend, name)]
        assert message.startswith("Expected more than 1 value per channel when training"), \
            f"rank {rank}: {message}"
        assert "over all 2 ranks" in message
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_one_value_per_rank_runs(sync_errors, backend):
    for result in sync_errors:
        message, rm, rv = result[(backend, "one_value_each")]
        assert message == "ok"
        assert torch.isfinite(rv).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_eps_zero_raises_on_every_rank(sync_errors, backend):
    for result in sync_errors:
        message = result[(backend, "eps_zero")][0]
        assert message == "batch_norm eps must be positive during training, but got 0.0"
