"""Helpers for the module / model tests: run a fused model, its eager twin (in eager's precision
class: tests/helpers.py) and an fp64 copy of the twin through the same optimizer steps in lockstep,
and hold the fused one to the tolerance rule (helpers.assert_rule) against the fp64 copy."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os

import torch
import torch.nn.functional as F

import fastres
from helpers import (DOUBLE_ACC, assert_rule, assert_three, eager_orders, eager_precision_class,
                     fp32_order, gpu_faithful, relu_ties, run_three)

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_backend_available() -> bool:
    return (importlib.util.find_spec("fastres.triton.batch_norm_act") is not None
            and fastres.backend_status()["triton"][0])


# The module tests run the Triton kernels (under the interpreter on CPU) once that backend exists.
TEST_BACKEND = "triton" if triton_backend_available() else "torch"


_torch_relu, _F_relu = torch.relu, F.relu


@contextlib.contextmanager
def relu_sites(model: torch.nn.Module, record: list, masks: dict):
    """Within the block, every ReLU ``model`` applies is a numbered site (in call order): the
    explicit ones (F.relu, torch.relu, nn.ReLU — run out of place) record their input (the
    pre-activation) in ``record``; a fastres BatchNormAct2d with activation "relu" records None (its
    pre-activation stays inside the kernel). The gradient reaching site k's output is zeroed where
    ``masks[k]`` (filled in before backward) is True."""
    from fastres.nn.batch_norm_act import BatchNormAct2d

    inside_fused = [0]

    def site(y, z):
        k = len(record)
        record.append(z)
        if y.requires_grad:
            y.register_hook(lambda g, k=k: g.masked_fill(masks[k], 0) if k in masks else g)

    def relu(input, inplace=False):
        y = _torch_relu(input)
        if not inside_fused[0]:
            site(y, input.detach().clone())
        return y

    def pre_hook(module, args):
        inside_fused[0] += 1

    def post_hook(module, args, output):
        inside_fused[0] -= 1
        if module.activation == "relu":
            site(output, None)

    handles = []
    for m in model.modules():
        if isinstance(m, BatchNormAct2d):
            handles += [m.register_forward_pre_hook(pre_hook), m.register_forward_hook(post_hook)]
    torch.relu, F.relu = relu, relu
    try:
        yield
    finally:
        torch.relu, F.relu = _torch_relu, _F_relu
        for h in handles:
            h.remove()


def _cast(t, dtype, memory_format=None):
    t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
    return t if memory_format is None else t.contiguous(memory_format=memory_format)


def _sync_state(models: dict, opts: dict, source: str) -> None:
    """Every model's parameters, floating buffers and SGD momentum buffers := ``source``'s, cast to
    each model's own dtypes (integer buffers such as num_batches_tracked are checked equal)."""
    src = models[source]
    src_params, src_buffers = dict(src.named_parameters()), dict(src.named_buffers())
    src_momentum = {key: opts[source].state.get(p, {}).get("momentum_buffer")
                    for key, p in src_params.items()} if opts[source] is not None else {}
    with torch.no_grad():
        for name, model in models.items():
            if name == source:
                continue
            params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
            assert params.keys() == src_params.keys() and buffers.keys() == src_buffers.keys(), (
                f"{name} and {source} differ in parameters or buffers")
            for key, p in params.items():
                p.copy_(src_params[key])
                state = opts[name].state.get(p) if opts[name] is not None else None
                if state and state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].copy_(src_momentum[key])
            for key, b in buffers.items():
                if b.is_floating_point():
                    b.copy_(src_buffers[key])
                else:
                    assert torch.equal(b, src_buffers[key]), f"{name} {key}: {b} vs {source}"


def run_lockstep(models: dict, contexts: dict, inputs, grad_outputs, *, steps=3, train=True,
                 dtypes: dict, residuals=None, autocast=False, lr=0.05, ties_from=None,
                 formats: dict | None = None, sync_from: str | None = None):
    """Run ``steps`` SGD-with-momentum steps of every model in ``models`` ({name: module}), step by
    step together. Returns {name: {key: tensor}}: per step the output and the gradients of the
    input, the residual and every parameter; at the end every parameter and buffer.

    ``dtypes[name]`` casts that model's inputs (the model itself is cast by the caller), and
    ``formats[name]`` (if given) sets their memory format;
    ``contexts[name]()`` is entered around its forward and backward. ``ties_from = (eager, ref)``:
    the ReLU sites where eager's and the fp64 reference's pre-activations say the mask is a tie
    (helpers.relu_ties) get a zero gradient in every model — so no gradient depends on how those
    masks fall, and nothing else is excluded (see relu_sites).

    ``sync_from``: before every step after the first, every model's parameters, buffers and
    momentum buffers are set to that model's (cast to each model's dtype), so each step — its
    outputs, gradients, running-statistic updates and optimizer update, recorded per step as
    ``step{k}.state.*`` — is computed by every model from the same state: one step of the fused
    model is compared with one step of eager from identical inputs, and no step's comparison
    carries the chaotic divergence of the earlier steps' roundings through the trajectory."""
    params = {name: dict(m.named_parameters()) for name, m in models.items()}
    opts = {name: torch.optim.SGD(p.values(), lr=lr, momentum=0.9) if p else None
            for name, p in params.items()}
    out = {name: {} for name in models}
    for m in models.values():
        m.train(train)
    for step in range(steps):
        if sync_from is not None and step > 0:
            _sync_state(models, opts, sync_from)
        ys, args_of, records, masks = {}, {}, {}, {}
        for name, model in models.items():
            d, fmt = dtypes[name], (formats or {}).get(name)
            args = [_cast(inputs[step], d, fmt).requires_grad_()]
            if residuals is not None:
                args.append(_cast(residuals[step], d, fmt).requires_grad_())
            records[name], masks[name] = [], {}
            amp = (torch.autocast("cpu", dtype=torch.bfloat16) if autocast and d != torch.float64
                   else contextlib.nullcontext())
            with contexts[name](), amp, relu_sites(model, records[name], masks[name]):
                ys[name] = model(*args)
            args_of[name] = args
        if ties_from is not None:
            e_rec, r_rec = records[ties_from[0]], records[ties_from[1]]
            assert len(e_rec) == len(r_rec), "eager and its fp64 copy differ in ReLU sites"
            ties = {k: relu_ties(ze.to(zr.device), zr) for k, (ze, zr) in enumerate(zip(e_rec, r_rec))
                    if ze is not None and zr is not None}
            ties = {k: t for k, t in ties.items() if t.any()}
            if ties:
                for name in models:
                    assert len(records[name]) == len(r_rec), (
                        f"{name}: {len(records[name])} ReLU sites, eager {len(r_rec)}: cannot map "
                        f"the ReLU ties {sorted(ties)}")
                    masks[name].update(ties)
        for name, model in models.items():
            y, args = ys[name], args_of[name]
            g = grad_outputs[step].to(y.dtype)
            targets = args + list(params[name].values())
            with contexts[name]():
                grads = torch.autograd.grad(y, targets, g, allow_unused=True)
            o = out[name]
            o[f"step{step}.output"] = y.detach()
            names = ["input", "residual"][:len(args)] + list(params[name])
            for key, grad in zip(names, grads):
                if grad is not None:
                    o[f"step{step}.grad.{key}"] = grad
            for p, grad in zip(params[name].values(), grads[len(args):]):
                p.grad = grad
            if opts[name] is not None and train:
                opts[name].step()
            if sync_from is not None and step < steps - 1:
                for key, t in list(model.named_parameters()) + list(model.named_buffers()):
                    o[f"step{step}.state.{key}"] = t.detach().clone()
    for name, model in models.items():
        for key, t in list(model.named_parameters()) + list(model.named_buffers()):
            out[name][f"final.{key}"] = t.detach().clone()
    return out


def run_steps(model, inputs, grad_outputs, *, steps=3, train=True, dtype=None, residuals=None,
              autocast=False, lr=0.05):
    """One model on its own (see run_lockstep)."""
    return run_lockstep({"m": model}, {"m": contextlib.nullcontext}, inputs, grad_outputs,
                        steps=steps, train=train, dtypes={"m": dtype}, residuals=residuals,
                        autocast=autocast, lr=lr)["m"]


def _other_layout(inputs) -> torch.memory_format:
    """The memory format the ensemble's second layout uses: channels_last for NCHW inputs and
    contiguous for channels_last ones."""
    x = inputs[0]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last


def eager_ensemble(inputs) -> list:
    """The equivalent eager executions whose largest error, element by element, is eager's
    precision class for a composition (see compare_models): [(summation order, memory format or
    None for the inputs' own, composed BN)]. Each order of helpers.eager_orders in the inputs'
    layout (GPU-faithful mode: BN as the fp32-accumulating composition), order 0 in the other
    layout, and, in the default CPU mode, BN as the composition with ATen's CPU accumulation
    (helpers.DOUBLE_ACC) in both layouts."""
    other = _other_layout(inputs)
    members = [(k, None, False) for k in eager_orders()] + [(0, other, False)]
    if not gpu_faithful():
        members += [(DOUBLE_ACC, None, True), (DOUBLE_ACC, other, True)]
    return members


@contextlib.contextmanager
def capture_layers(model: torch.nn.Module, record: dict):
    """Within the block, the first call of every fastres BatchNormAct2d in ``model`` (SyncBN aside)
    is recorded in ``record[name]``: its input and residual, its parameters and running
    statistics as they were before the call, its configuration, its output, and the gradient
    that reaches that output in backward — everything ``check_layers`` needs to run the same
    layer again, on exactly these inputs, next to eager's op and the fp64 one."""
    from fastres.nn.batch_norm_act import BatchNormAct2d

    def pre_hook(name, module, args, kwargs):
        if name in record:
            return
        x = args[0]
        residual = args[1] if len(args) > 1 else kwargs.get("residual")

        def copy_of(t):
            return None if t is None else t.detach().clone()

        count = module.num_batches_tracked
        record[name] = dict(
            module=module, x=copy_of(x), residual=copy_of(residual),
            weight=copy_of(module.weight), bias=copy_of(module.bias),
            running_mean=copy_of(module.running_mean), running_var=copy_of(module.running_var),
            count=None if count is None else int(count) + 1, training=module.training)

    def post_hook(name, module, args, output):
        entry = record[name]
        if "output" in entry:
            return
        entry["output"] = output.detach().clone()
        if output.requires_grad:
            output.register_hook(lambda g: entry.setdefault("grad_out", g.detach().clone()))

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, BatchNormAct2d) and m.process_group is None:
            handles.append(m.register_forward_pre_hook(
                lambda mod, a, kw, name=name: pre_hook(name, mod, a, kw), with_kwargs=True))
            handles.append(m.register_forward_hook(
                lambda mod, a, out, name=name: post_hook(name, mod, a, out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_layers(record: dict, what: str = "") -> None:
    """Each recorded layer (``capture_layers``) run again as one op on the very inputs it had in
    the model — fused, eager's precision class (every summation order of helpers.eager_orders) and
    fp64 — and held to the rule per channel (helpers.run_three / assert_three): output, input,
    residual, weight and bias gradients, running statistics. That is the per-channel rule inside a
    model: in the model-level comparison each layer's input already differs between fused and
    eager by upstream rounding (see compare_models), here it does not. The re-run fused output
    must equal the one the model computed bitwise (the kernels are deterministic), so what is
    checked is what the model ran. A layer no gradient reached (a forward-only comparison) gets a
    random one (not all ones: then dweight = Σ x̂ = 0 exactly, and the rule would compare nothing
    but the rounding of the mean against a zero floor)."""
    generator = torch.Generator().manual_seed(7)
    for name, e in record.items():
        if e.get("grad_out") is None:
            e["grad_out"] = torch.randn(e["output"].shape, generator=generator)
        module = e["module"]
        training = e["training"] or (e["running_mean"] is None and e["running_var"] is None)
        momentum = module.momentum
        if momentum is None:
            momentum = 1.0 / e["count"] if e["count"] else 0.0
        if e["training"] and not module.track_running_stats:
            e["running_mean"] = e["running_var"] = None

        def fused_fn(x, rm, rv, w, b, training, momentum, eps, residual, activation,
                     mask_from_output=module.mask_from_output):
            return fastres.functional.batch_norm_act(
                x, rm, rv, w, b, training, momentum, eps, residual=residual,
                activation=activation, mask_from_output=mask_from_output)

        res = run_three(e["x"], residual=e["residual"], weight=e["weight"], bias=e["bias"],
                        running_mean=e["running_mean"], running_var=e["running_var"],
                        training=training, momentum=momentum, eps=module.eps,
                        activation=module.activation, grad_out=e["grad_out"],
                        param_dtype=(e["weight"].dtype if e["weight"] is not None
                                     else torch.float32),
                        fused_fn=fused_fn)
        assert torch.equal(res["fused"][0], e["output"]), (
            f"{what} layer {name}: the re-run differs from the model's own output")
        assert_three(res, f"{what} layer {name}")


def compare_models(fused, eager, inputs, grad_outputs, *, steps=3, train=True, dtype=None,
                   residuals=None, autocast=False, lr=0.05, what="", per_channel=True,
                   check_each_layer=True):
    """fused and eager (same parameters, same state_dict keys) against an fp64 copy of eager.

    Eager's precision class for a composition is an ENSEMBLE of equivalent eager executions
    (``eager_ensemble``): copies of eager, from the same start, run in eager's precision class
    (helpers.eager_precision_class) in each summation order of helpers.eager_orders, once with
    the model and its inputs in the other memory format (NCHW ↔ channels_last, where ATen picks
    other convolution and batch-norm kernels, with other summation orders), and in the default
    CPU mode also in both layouts with BN as the elementwise composition of helpers.Fp32ClassBatchNorm with
    double accumulation (ATen's CPU precision class: sums in double, each elementwise step
    rounded to fp32, in another order of steps than ATen's fused CPU kernel; in GPU-faithful
    mode every member already computes BN that way, with fp32 accumulation). Each tensor is
    held to the rule against the largest error over the ensemble, element by element.

    Why that is fair, and why one eager run is not: after a few layers and optimizer steps, an
    element's error is a sum of many roundings, each propagated through the layers after it (a
    1/2-ulp difference in one BN output reaches every downstream gradient; each SGD step adds its
    own rounding to every parameter). Its size at one element is rounding luck: one eager run
    lands within 0.07 ulp of the fp64 value on one channel where a second, equally exact run
    (or a fused kernel that rounds each output once, correctly) lands 2 ulps away — measured on
    BatchNormAct2d's final weight after three steps. Members that share eager's BN kernel share
    its rounding pattern at every BN output, so layouts alone sample the class poorly where BN
    dominates (a Bottleneck's dbias, bf16); the composed member rounds BN's elementwise steps
    differently, as a fused kernel does. Every member computes what eager computes, to the same
    precision (same accumulation width as eager in that mode, every elementwise op rounded once
    to the result dtype), in an order or layout eager itself uses on some device or input, so the
    largest error among them is eager's class at that element, sampled a few times instead of
    once; none is loosened (no member computes in a lower precision than eager in that mode). A real defect (a wrong channel, a lost term, a wrong mask, a statistic
    off by more than rounding) is orders of magnitude beyond any member's error.

    ReLU ties are handled as run_lockstep says (with eager0's pre-activations). Every step starts
    from the reference's state (run_lockstep's ``sync_from``), so each step is one step of each
    model from identical parameters, buffers and momentum.

    Per-channel vectors are held to the rule channel by channel (``per_channel``, default) — for a
    module or a block, whose channels' errors come from a few layers. A deep model
    (``per_channel=False``: tests/test_convert.py, tests/test_models.py) holds them as whole
    vectors: there a channel's error is the sum of tens of layers' upstream roundings, an
    independent draw on each side, and the largest over the ensemble still underestimates eager's
    class for a few channels in a hundred (measured: resnet18's stem bn1.weight, 4 of 64). The
    per-channel rule then holds inside the model, layer by layer: ``check_each_layer`` runs each
    fused BatchNormAct2d again on the very inputs it had at step 0 (check_layers) against eager's
    op and fp64 on those inputs, channel by channel. Returns (fused, eager, reference) results."""
    reference = copy.deepcopy(eager).double()
    members = eager_ensemble(inputs)
    eagers = [eager] + [copy.deepcopy(eager) for _ in members[1:]]
    if dtype is not None:
        fused = fused.to(dtype)
        eagers = [e.to(dtype) for e in eagers]
    models = {"ref": reference, "fused": fused}
    contexts = {"ref": contextlib.nullcontext, "fused": contextlib.nullcontext}
    dtypes = {"ref": torch.float64, "fused": dtype}
    formats = {}
    names = []
    for i, ((k, fmt, composed), e) in enumerate(zip(members, eagers)):
        name = f"eager{i}"
        if fmt is not None:
            e = e.to(memory_format=fmt)
            formats[name] = fmt
        models[name], dtypes[name], names = e, dtype, names + [name]
        contexts[name] = lambda k=k, composed=composed: _eager_class(k, composed)
    layers: dict = {}
    with capture_layers(fused, layers):
        res = run_lockstep(models, contexts, inputs, grad_outputs, steps=steps, train=train,
                           dtypes=dtypes, residuals=residuals, autocast=autocast, lr=lr,
                           ties_from=("eager0", "ref"), formats=formats, sync_from="ref")
    f, r = res["fused"], res["ref"]
    es = [res[name] for name in names]
    e = es[0]
    assert f.keys() == e.keys() == r.keys(), (
        f"{what}: compared tensors differ: {sorted(set(f) ^ set(e))}")
    for key in f:
        if f[key].dtype in (torch.int64, torch.int32):
            assert torch.equal(f[key], e[key]), f"{what} {key}: {f[key]} vs eager {e[key]}"
        else:
            assert_rule(f[key], [x[key] for x in es], r[key], name=f"{what} {key}",
                        per_channel=per_channel and f[key].dim() == 1)
    if check_each_layer:
        check_layers(layers, what)
    return f, e, r


@contextlib.contextmanager
def _eager_class(k, composed=False):
    with eager_precision_class(composed), fp32_order(k):
        yield


def make_inputs(shape, steps=3, seed=0, channels_last=False, offset=0.0):
    """``steps`` random tensors; ``offset`` adds per-channel means drawn from [-offset, offset]
    (BN inputs: the running mean is then not ~0, so the tolerance floor, which scales with the
    reference's magnitude, does not demand more than fp32 can give for a mean of O(1) values)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g) for _ in range(steps)]
    if offset:
        shift = (torch.rand(shape[1], generator=g) * 2 - 1) * offset
        xs = [x + shift.view(1, -1, 1, 1) for x in xs]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    return xs


def randomize_bn(model, seed=0):
    """Non-trivial BN affine parameters and running statistics (so eval mode tests something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def compare_wiring_fp64(fused, eager, inputs, grad_outputs, *, steps=3, train=True, lr=1e-3,
                        what=""):
    """The converted model against the original, both in float64 with the pure-PyTorch backend: an
    exact check of the conversion's wiring (which BN got which residual and activation, shared
    parameters, running-stat updates), free of fp32 rounding and of ReLU-mask ties. (1e-6, not
    1e-15: small-batch BN in a deep net amplifies fp64 rounding ~1e8-fold after an optimizer step;
    a wiring mistake is an O(1) difference.)"""
    fused, eager = copy.deepcopy(fused).double(), copy.deepcopy(eager).double()
    with fastres.use_backend("torch"):
        f = run_steps(fused, inputs, grad_outputs, steps=steps, train=train, lr=lr,
                      dtype=torch.float64)
    e = run_steps(eager, inputs, grad_outputs, steps=steps, train=train, lr=lr, dtype=torch.float64)
    assert f.keys() == e.keys(), f"{what}: compared tensors differ: {sorted(set(f) ^ set(e))}"
    for key in f:
        scale = max(e[key].double().abs().max().item(), 1.0) if e[key].numel() else 1.0
        torch.testing.assert_close(f[key], e[key], rtol=1e-6, atol=1e-6 * scale,
                                   msg=lambda m: f"{what} {key}: {m}")
    return f, e
