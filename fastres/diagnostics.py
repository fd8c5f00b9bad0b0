"""Gradient-flow diagnostics: how large are the gradients at each depth of a network, step by step?

``GradientFlow(model)`` records, for every training step,

* the L2 norm of the gradient of every parameter tensor (read from ``.grad`` by a
  ``register_post_accumulate_grad_hook`` on each parameter, so under gradient accumulation it is the
  norm of the accumulated ``.grad`` at the end of the step);
* for every residual block (torchvision-style: a module with a ``conv1`` child and a ``downsample``
  attribute, e.g. ``torchvision.models.resnet.BasicBlock``/``Bottleneck`` or ``fastres.BasicBlock``),
  the norm of the gradient entering the block's input, split into the part that arrives through the
  residual branch and the part that arrives through the shortcut.

How the split is measured. A block computes ``out = act(branch(x) + shortcut(x))`` and the gradient
entering ``x`` is the sum of the two paths' contributions, ``g_in = g_branch + g_shortcut``. A forward
pre-hook on the block replaces its input by an alias ``x_in = x.view_as(x)`` (no copy) and a forward
pre-hook on ``block.conv1`` (the first op of the branch) replaces the branch's input by a second alias
``x_br = x_in.view_as(x_in)``. Tensor hooks on the aliases then see exactly ``g_in`` (everything the block
sends back to its input, and nothing a caller outside the block adds) and ``g_branch``; the shortcut's
part is the vector difference ``g_shortcut = g_in - g_branch`` (for an identity shortcut this is the
gradient at the residual sum; with a ``downsample`` it is what flows back through the projection). A
block called several times in one step (micro-batches, weight sharing) accumulates the squared norms,
i.e. reports the norm over all its calls. Blocks whose ``conv1`` is not called in the forward record
only ``g_in``.

No host synchronisation per layer: every norm is computed on the gradient's device in fp32 and written
into a per-step device buffer (NaN where nothing was recorded); ``step()`` appends the buffer to the
history, and the reports (``history()``, ``stats()``, ``summary()``, ``plot()``) move the whole history
to the host with one ``.cpu()`` call.

Usage::

    with GradientFlow(model) as flow:          # or GradientFlow(model, optimizer=opt): auto step()
        for x, y in loader:
            loss_fn(model(x), y).backward()
            flow.step()                         # closes the step's record (optimizer hook does it too)
            opt.step(); opt.zero_grad()
    print(flow.summary())
    flow.plot("grad_flow.png")
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

__all__ = ["GradientFlow", "find_residual_blocks"]

_BLOCK_FIELDS = ("input", "branch", "shortcut")


def find_residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Torchvision-style residual blocks of ``model``: modules with a ``conv1`` child module and a
    ``downsample`` attribute (a module or None), in registration order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "conv1", None), nn.Module) and hasattr(module, "downsample"):
            found.append((name, module))
    return found


def _grad_norm(grad: torch.Tensor) -> torch.Tensor:
    if grad.is_sparse:
        grad = grad.coalesce().values()
    return torch.linalg.vector_norm(grad, dtype=torch.float32)


class GradientFlow:
    """Records per-step gradient norms of every parameter and of every residual block's two paths.

    Args:
        model: the network. Parameters are recorded in ``model.named_parameters()`` order, which is the
            order of depth for networks whose modules are registered input-to-output (the usual case).
        optimizer: if given, ``step()`` is called automatically just before each ``optimizer.step()``.
        blocks: the residual blocks to split into shortcut/branch gradients, as ``(name, module)`` pairs;
            default: ``find_residual_blocks(model)``. The branch is taken to start at ``module.conv1``;
            a block without a ``conv1`` module records only its total input gradient. Pass ``[]`` to
            record parameters only.
        parameters: a predicate ``(name, param) -> bool`` choosing which trainable parameters to
            record; default: all parameters with ``requires_grad``.

    The hooks are attached on construction and removed by ``remove()`` or on leaving a ``with`` block;
    the recorded data stays available afterwards.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 blocks: Iterable[tuple[str, nn.Module]] | None = None,
                 parameters: Callable[[str, nn.Parameter], bool] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradientFlow needs an nn.Module, got {type(model).__name__}")
        chosen = [(n, p) for n, p in model.named_parameters()
                  if p.requires_grad and (parameters is None or parameters(n, p))]
        if not chosen:
            raise ValueError("GradientFlow: the model has no trainable parameters to record")
        self.param_names = [n for n, _ in chosen]
        self.param_shapes = [tuple(p.shape) for _, p in chosen]
        self.blocks = list(find_residual_blocks(model) if blocks is None else blocks)
        for entry in self.blocks:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], nn.Module)):
                raise TypeError("GradientFlow: blocks must be (name, module) pairs")
        self.block_names = [n for n, _ in self.blocks]
        self._num_params = len(chosen)
        # Buffer layout per step: [param norms | block input | block branch | block shortcut].
        # The block slots hold squared norms until step() takes their square root.
        self._block_offset = self._num_params
        self._width = self._num_params + len(_BLOCK_FIELDS) * len(self.blocks)
        self._rows: list[torch.Tensor] = []
        self._current: torch.Tensor | None = None
        self._host_cache: torch.Tensor | None = None
        self._handles = []
        for index, (_, param) in enumerate(chosen):
            self._handles.append(param.register_post_accumulate_grad_hook(self._param_hook(index)))
        for index, (_, block) in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._block_input_hook(index)))
            branch_entry = getattr(block, "conv1", None)
            if isinstance(branch_entry, nn.Module):
                self._handles.append(branch_entry.register_forward_pre_hook(self._branch_input_hook(index)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.step()))

    # ----------------------------------------------------------------------------------- recording
    def _buffer(self, grad: torch.Tensor) -> torch.Tensor:
        """This step's record, created on the device of the first gradient seen in the step."""
        if self._current is None:
            self._current = torch.full((self._width,), math.nan, dtype=torch.float32, device=grad.device)
            self._written_blocks = set()
        return self._current

    def _param_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                row = self._buffer(param.grad)
                row[index] = _grad_norm(param.grad).to(row.device, non_blocking=True)
        return hook

    def _add_block(self, index: int, field: int, grad: torch.Tensor) -> None:
        slot = self._block_offset + field * len(self.blocks) + index
        row = self._buffer(grad)
        square = _grad_norm(grad).to(row.device, non_blocking=True).square()
        if slot in self._written_blocks:  # host-side bookkeeping: no device sync
            row[slot] += square
        else:
            row[slot] = square
            self._written_blocks.add(slot)

    def _block_input_hook(self, index: int):
        def pre_hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            if not (torch.is_grad_enabled() and x.requires_grad):
                return None
            x_in = x.view_as(x)
            branch_grad: list[torch.Tensor] = []  # filled by the branch hook during backward
            # Lets the conv1 pre-hook recognise the block's own input and find where to put its gradient.
            x_in._fastres_gradient_flow = (self, index, branch_grad)

            def on_input_grad(grad: torch.Tensor) -> None:
                self._add_block(index, 0, grad)
                if branch_grad:
                    self._add_block(index, 1, branch_grad[0])
                    self._add_block(index, 2, grad - branch_grad[0])
                    branch_grad.clear()

            x_in.register_hook(on_input_grad)
            return (x_in,) + tuple(args[1:])
        return pre_hook

    def _branch_input_hook(self, index: int):
        def pre_hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x_in = args[0]
            tag = getattr(x_in, "_fastres_gradient_flow", None)
            # Only split when conv1 consumes the block's own input (not, say, a pre-activated copy).
            if tag is None or tag[0] is not self or tag[1] != index:
                return None
            branch_grad = tag[2]
            x_branch = x_in.view_as(x_in)

            def on_branch_grad(grad: torch.Tensor) -> None:
                # Runs before on_input_grad: x_in's gradient is complete only after the branch's part.
                branch_grad[:] = [grad]

            x_branch.register_hook(on_branch_grad)
            return (x_branch,) + tuple(args[1:])
        return pre_hook

    def step(self) -> None:
        """Close the current step's record (a no-op when nothing was recorded since the last call)."""
        if self._current is None:
            return
        row = self._current
        row[self._block_offset:] = row[self._block_offset:].sqrt()  # squared norms -> norms; NaN stays
        self._rows.append(row)
        self._current = None
        self._host_cache = None

    def reset(self) -> None:
        """Forget everything recorded so far (the hooks stay attached)."""
        self._rows.clear()
        self._current = None
        self._host_cache = None

    def remove(self) -> None:
        """Detach all hooks; the recorded data stays available."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "GradientFlow":
        return self

    def __exit__(self, *exc) -> None:
        self.step()
        self.remove()

    @property
    def num_steps(self) -> int:
        return len(self._rows) + (self._current is not None)

    # ------------------------------------------------------------------------------------- reports
    def _host(self) -> torch.Tensor:
        """[steps, width] on the host: one device-to-host transfer for the whole history."""
        self.step()  # a backward pass since the last step() counts as a final step
        if self._host_cache is None:
            if not self._rows:
                raise RuntimeError("GradientFlow: nothing recorded yet (run a backward pass first)")
            devices = {row.device for row in self._rows}
            if len(devices) == 1:
                self._host_cache = torch.stack(self._rows).cpu()
            else:  # the model moved between steps: one transfer per device-run of rows is unavoidable
                self._host_cache = torch.stack([row.cpu() for row in self._rows])
        return self._host_cache

    def _select(self, params: str) -> list[int]:
        if params == "all":
            return list(range(self._num_params))
        if params == "weights":
            picked = [i for i, s in enumerate(self.param_shapes) if len(s) >= 2]
            return picked or list(range(self._num_params))
        raise ValueError(f"params must be 'weights' (tensors with >= 2 dims) or 'all', got {params!r}")

    def history(self) -> dict:
        """Raw data: ``{"steps": n, "params": {name: [norm per step]}, "blocks": {name: {"input": [...],
        "branch": [...], "shortcut": [...]}}}``; NaN where nothing was recorded in a step."""
        data = self._host()
        nb = len(self.blocks)
        blocks = {}
        for j, name in enumerate(self.block_names):
            blocks[name] = {field: data[:, self._block_offset + f * nb + j].tolist()
                            for f, field in enumerate(_BLOCK_FIELDS)}
        return {
            "steps": data.shape[0],
            "params": {name: data[:, i].tolist() for i, name in enumerate(self.param_names)},
            "blocks": blocks,
        }

    def norms(self, params: str = "weights") -> tuple[list[str], torch.Tensor]:
        """``(names, tensor[steps, layers])`` of parameter gradient norms, in depth order."""
        index = self._select(params)
        return [self.param_names[i] for i in index], self._host()[:, index]

    def stats(self, params: str = "weights") -> list[dict]:
        """One dict per recorded parameter: depth, layer, shape, mean/min/max over steps of its gradient
        norm, and ``ratio_to_last``: its mean divided by the last (deepest) layer's mean."""
        names, norms = self.norms(params)
        with warnings.catch_warnings():  # a layer with no gradient in any step gives NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            values = norms.numpy()
            mean, low, high = (torch.from_numpy(f(values, axis=0)) for f in (np.nanmean, np.nanmin, np.nanmax))
        last = mean[-1].item()
        no_reference = last == 0.0 or math.isnan(last)
        shapes = dict(zip(self.param_names, self.param_shapes))
        rows = []
        for depth, name in enumerate(names):
            m = mean[depth].item()
            rows.append({"depth": depth, "layer": name, "shape": shapes[name], "mean": m,
                         "min": low[depth].item(), "max": high[depth].item(),
                         "ratio_to_last": math.nan if no_reference else m / last})
        return rows

    def block_stats(self) -> list[dict]:
        """One dict per residual block: mean over steps of the input / branch / shortcut gradient norms and
        ``shortcut_share`` = mean shortcut norm / mean input norm."""
        data = self._host()
        nb = len(self.blocks)
        rows = []
        for j, name in enumerate(self.block_names):
            row = {"block": name}
            for f, field in enumerate(_BLOCK_FIELDS):
                col = data[:, self._block_offset + f * nb + j]
                col = col[~torch.isnan(col)]
                row[field] = col.mean().item() if col.numel() else math.nan
            row["shortcut_share"] = row["shortcut"] / row["input"] if row["input"] else math.nan
            rows.append(row)
        return rows

    def summary(self, params: str = "weights", tablefmt: str = "simple") -> str:
        """A text table (depth, layer, mean / min / max gradient norm over steps, ratio to the last layer),
        followed by a per-block table of input / branch / shortcut gradient norms when blocks exist."""
        rows = self.stats(params)
        try:
            from tabulate import tabulate
        except ImportError as e:
            raise ImportError("GradientFlow.summary() needs tabulate: pip install tabulate (the raw numbers "
                              "are available without it from stats(), block_stats() and history())") from e

        table = tabulate(
            [[r["depth"], r["layer"], r["mean"], r["min"], r["max"], r["ratio_to_last"]] for r in rows],
            headers=["depth", "layer", "mean |grad|", "min |grad|", "max |grad|", "ratio to last"],
            tablefmt=tablefmt, floatfmt=".3g")
        text = f"gradient norms over {self._host().shape[0]} step(s)\n{table}"
        if self.blocks:
            brows = self.block_stats()
            btable = tabulate(
                [[r["block"], r["input"], r["branch"], r["shortcut"], r["shortcut_share"]] for r in brows],
                headers=["block", "|grad in|", "via branch", "via shortcut", "shortcut / in"],
                tablefmt=tablefmt, floatfmt=".3g")
            text += "\n\ngradient entering each residual block (mean over steps)\n" + btable
        return text

    def plot(self, path, params: str = "weights", title: str | None = None, max_lines: int = 12) -> None:
        """Write a PNG: gradient norm (log scale) by depth, one line per step (colour = step), plus a panel
        of shortcut vs branch gradient per residual block when the model has blocks."""
        plt = _pyplot()
        names, norms = self.norms(params)
        steps = norms.shape[0]
        picks = sorted(set(round(i * (steps - 1) / max(max_lines - 1, 1)) for i in range(min(steps, max_lines))))
        panels = 2 if self.blocks else 1
        fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
        ax = axes[0][0]
        cmap = plt.get_cmap("viridis")
        for k, s in enumerate(picks):
            ax.plot(range(len(names)), norms[s].numpy(), color=cmap(k / max(len(picks) - 1, 1)),
                    marker=".", linewidth=1, label=f"step {s}")
        ax.set_yscale("log")
        ax.set_xlabel("depth (weight tensor index, input → output)")
        ax.set_ylabel("gradient L2 norm")
        ax.set_title(title or "gradient norm by depth")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
        if self.blocks:
            brows = self.block_stats()
            ax = axes[0][1]
            x = range(len(brows))
            for field, style in (("input", "k-"), ("shortcut", "C0.-"), ("branch", "C3.-")):
                ax.plot(x, [r[field] for r in brows], style, label=f"via {field}" if field != "input" else "total in")
            ax.set_yscale("log")
            ax.set_xlabel("residual block (input → output)")
            ax.set_ylabel("gradient L2 norm entering the block")
            ax.set_title("shortcut vs residual branch (mean over steps)")
            ax.legend(fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _pyplot():
    """matplotlib.pyplot with a non-interactive backend, or a clear ImportError."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("fastres.diagnostics plotting needs matplotlib, an optional dependency: "
                          "pip install matplotlib (or pip install fastres[plot])") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
