"""CUDA graphs: a whole training step of a converted ResNet-18 (forward, backward, SGD step) captured
with torch.cuda.graph and replayed gives the results of the same steps run uncaptured. Capture fails
outright on any host synchronisation, so this also proves the fastres path has none."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastres

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.gpu


def _model(channels_last):
    torch.manual_seed(0)
    model = fastres.convert(torchvision.models.resnet18(num_classes=10)).cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _batches(n, channels_last, batch=8, size=64):
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(torch.randn(batch, 3, size, size, generator=g).cuda().contiguous(memory_format=fmt),
             torch.randint(0, 10, (batch,), generator=g).cuda()) for _ in range(n)]


def _state(model, optimizer):
    tensors = {f"param {k}": v for k, v in model.named_parameters()}
    tensors.update({f"buffer {k}": v for k, v in model.named_buffers()})
    for i, p in enumerate(model.parameters()):
        buf = optimizer.state[p].get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum {i}"] = buf
    return {k: v.detach().clone() for k, v in tensors.items()}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_training_step_graph_replay(channels_last, amp):
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    warmup, replays = 3, 3
    batches = _batches(warmup + replays, channels_last)
    criterion = nn.CrossEntropyLoss()
    models = {name: _model(channels_last) for name in ("eager", "graph")}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
                  for name, m in models.items()}

    def step(model, optimizer, x, y):
        optimizer.zero_grad(set_to_none=False)
        # autocast's weight-cast cache must be off under capture (the casts have to be replayed)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    # Uncaptured: every step eagerly.
    eager_losses = []
    for x, y in batches:
        eager_losses.append(step(models["eager"], optimizers["eager"], x, y).detach().clone())
    eager_state = _state(models["eager"], optimizers["eager"])

    # Captured: warm up on a side stream (creates grads and momentum buffers), capture one step,
    # then replay it on fresh data copied into the static inputs.
    model, optimizer = models["graph"], optimizers["graph"]
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    graph_losses = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:warmup]:
            graph_losses.append(step(model, optimizer, x, y).detach().clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, optimizer, static_x, static_y)
    for x, y in batches[warmup:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        graph_losses.append(static_loss.detach().clone())
    torch.cuda.synchronize()
    graph_state = _state(model, optimizer)

    # The same kernels run in both; cuBLAS may pick another algorithm inside a capture, so allow
    # a few ulps of drift rather than demanding bitwise equality.
    for i, (a, b) in enumerate(zip(graph_losses, eager_losses)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"loss at step {i}")
    assert graph_state.keys() == eager_state.keys()
    for k in eager_state:
        torch.testing.assert_close(graph_state[k], eager_state[k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")
