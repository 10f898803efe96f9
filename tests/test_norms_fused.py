"""The fused training path of ``ema_batch`` and ``batch_renorm`` (stream_trainer.norms._fused)
against the reference path of the same layers (``layer.fused = False``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from stream_trainer.norms import BatchRenorm, EMABatchNorm, StreamNorm
from stream_trainer.norms._fused import (
    batch_renorm_forward,
    ema_batch_norm_forward,
    fused_norm_train,
)

C = 5
SIZES = [1, 2, 7, 256, 1, 1, 3, 2, 40, 1, 7]  # a stream of changing batch sizes, 1 included
FUSED_NODES = ("_FusedNormFnBackward",)

LAYERS: dict[str, Callable[[], StreamNorm]] = {
    "ema": lambda: EMABatchNorm(C),
    "ema-no-warm-start": lambda: EMABatchNorm(C, warm_start=False, momentum=0.05),
    "ema-momentum-1": lambda: EMABatchNorm(C, momentum=1.0),
    "ema-no-affine": lambda: EMABatchNorm(C, affine=False, momentum=0.1),
    "renorm-warming-up": lambda: BatchRenorm(C, warmup_start_samples=0, warmup_end_samples=300),
    "renorm-clipped": lambda: BatchRenorm(
        C, rmax=1.2, dmax=0.1, warmup_start_samples=0, warmup_end_samples=0
    ),
    "renorm-plain": lambda: BatchRenorm(C, warm_start=False),  # before warm-up: r = 1, d = 0
    "renorm-no-affine": lambda: BatchRenorm(
        C, affine=False, warmup_start_samples=10, warmup_end_samples=20
    ),
}
TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
F32_EPS = torch.finfo(torch.float32).eps
BUFFER_TOL = {
    torch.float64: {"rtol": 1e-13, "atol": 1e-13},
    torch.float32: {"rtol": 4 * F32_EPS, "atol": 16 * F32_EPS},
}


def _pair(make: Callable[[], StreamNorm], dtype: torch.dtype) -> tuple[StreamNorm, StreamNorm]:
    fused = make().to(dtype)
    with torch.no_grad():  # non-trivial affine parameters
        gen = torch.Generator().manual_seed(7)
        for p in fused.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    reference = copy.deepcopy(fused)
    reference.fused = False
    return fused, reference


def ema(x: torch.Tensor, *args: object) -> torch.Tensor:
    """The fused ``ema_batch`` training forward as the layer runs it: one autograd node."""
    return fused_norm_train(ema_batch_norm_forward, x, *args)


def _is_fused(y: torch.Tensor) -> bool:
    return type(y.grad_fn).__name__ in FUSED_NODES


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("extra", [(), (3,)], ids=["nc", "ncl"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_fused_path_equals_reference(name: str, extra: tuple[int, ...], dtype: torch.dtype) -> None:
    fused, reference = _pair(LAYERS[name], dtype)
    gen = torch.Generator().manual_seed(11)
    for step, n in enumerate(SIZES):
        x = torch.randn(n, C, *extra, generator=gen, dtype=dtype) * 2.0 + 0.5
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fused(xa), reference(xb)
        assert _is_fused(ya) and not _is_fused(yb)
        torch.testing.assert_close(ya, yb, **TOL[dtype], msg=f"output, step {step}")
        g = torch.randn(ya.shape, generator=gen, dtype=dtype)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype], msg=f"grad x, step {step}")
        for (pname, pa), pb in zip(fused.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, **TOL[dtype], msg=f"grad {pname}")
        fused.zero_grad()
        reference.zero_grad()
        # Running buffers: the same values to a few roundings of the dtype, relative to the
        # scale of the data (about 2 here; a mean that happens to be near 0 is not more exact).
        # In float64 the reference's own S2/n - mean^2 rounding is the larger one.
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(
                getattr(fused, key), getattr(reference, key), **BUFFER_TOL[dtype]
            )
        assert torch.equal(fused.samples_seen, reference.samples_seen)
    assert int(fused.samples_seen) == sum(SIZES) * (extra[0] if extra else 1)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    fused.eval()
    reference.eval()
    x = torch.randn(4, C, *extra, generator=gen, dtype=dtype)
    torch.testing.assert_close(fused(x), reference(x), **TOL[dtype])


@pytest.mark.parametrize("n", [1, 2, 7])
@pytest.mark.parametrize("extra", [(), (3,)], ids=["nc", "ncl"])
@pytest.mark.parametrize("seen", [0, 4, 10_000], ids=["first", "warm", "mature"])
def test_gradcheck_ema(n: int, extra: tuple[int, ...], seen: int) -> None:
    """The hand-written backward is the Jacobian of the fused forward (float64), at every
    weight a: a = 1 (first batch), a = n / (t + n) (warm start), a = 1 - (1 - m)^n."""
    dt = torch.float64
    gen = torch.Generator().manual_seed(3)
    mean0 = torch.randn(C, generator=gen, dtype=dt)
    var0 = torch.rand(C, generator=gen, dtype=dt) + 0.5
    a = 1.0 if seen == 0 else max(1 - 0.99**n, n / (seen + n))

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen_t = torch.tensor(seen)
        return ema(x, w, b, mean0.clone(), var0.clone(), seen_t, a, 1e-5)

    x = torch.randn(n, C, *extra, generator=gen, dtype=dt).requires_grad_()
    w = torch.randn(C, generator=gen, dtype=dt).requires_grad_()
    b = torch.randn(C, generator=gen, dtype=dt).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)

    def weight_only(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        seen_t = torch.tensor(seen)
        return ema(x, w, None, mean0.clone(), var0.clone(), seen_t, a, 1e-5)

    def no_affine(x: torch.Tensor) -> torch.Tensor:
        seen_t = torch.tensor(seen)
        return ema(x, None, None, mean0.clone(), var0.clone(), seen_t, a, 1e-5)

    assert torch.autograd.gradcheck(weight_only, (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(no_affine, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 7])
@pytest.mark.parametrize("extra", [(), (3,)], ids=["nc", "ncl"])
def test_gradcheck_renorm_where_exact(n: int, extra: tuple[int, ...]) -> None:
    """Batch renorm's backward is the exact Jacobian where r and d are constant: rmax = 1,
    dmax = 0 (batch norm), and far-off running moments (both clipped); n = 1 uses the running
    moments."""
    dt = torch.float64
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, C, *extra, generator=gen, dtype=dt).requires_grad_()
    w = torch.randn(C, generator=gen, dtype=dt).requires_grad_()
    b = torch.randn(C, generator=gen, dtype=dt).requires_grad_()
    cases = [(0.0, 1.0, 1.0, 0.0), (100.0, 100.0, 3.0, 5.0)]  # (mean0, var0, rmax, dmax)
    for mean_value, var_value, rmax, dmax in cases:
        mean0 = torch.full((C,), mean_value, dtype=dt)
        var0 = torch.full((C,), var_value, dtype=dt)

        def fn(
            x: torch.Tensor,
            w: torch.Tensor,
            b: torch.Tensor,
            mean0: torch.Tensor = mean0,
            var0: torch.Tensor = var0,
            rmax: float = rmax,
            dmax: float = dmax,
        ) -> torch.Tensor:
            seen_t = torch.tensor(100)
            m, v = mean0.clone(), var0.clone()
            return fused_norm_train(
                batch_renorm_forward, x, w, b, m, v, seen_t, 0.1, 1e-5, rmax, dmax
            )

        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["ema", "renorm-clipped"])
def test_reference_path_where_fused_does_not_apply(name: str) -> None:
    """A moment reducer that is not known to be the identity (even one that changes nothing), a
    dtype other than the layer's, half precision, or ``fused = False``: the reference path."""
    fused, _ = _pair(LAYERS[name], torch.float64)
    x = torch.randn(6, C, dtype=torch.float64)

    def passthrough(
        count: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return count, s1, s2

    synced = copy.deepcopy(fused)
    synced.moment_reducer = passthrough
    y_sync, y_fused = synced(x.clone().requires_grad_()), fused(x.clone().requires_grad_())
    assert _is_fused(y_fused) and not _is_fused(y_sync)
    torch.testing.assert_close(y_sync, y_fused)
    torch.testing.assert_close(synced.running_var, fused.running_var)

    class Declared:  # a reducer that says when it is the identity (e.g. a distributed one)
        is_identity = True

        def __call__(
            self, count: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return count, s1, s2

    declared = copy.deepcopy(fused)
    declared.moment_reducer = Declared()
    assert _is_fused(declared(x.clone().requires_grad_()))
    Declared.is_identity = False
    assert not _is_fused(declared(x.clone().requires_grad_()))

    mixed = copy.deepcopy(fused).float()  # float32 layer, float64 input
    assert not _is_fused(mixed(x.clone().requires_grad_()))
    half = copy.deepcopy(fused).to(torch.bfloat16)
    assert not _is_fused(half(x.to(torch.bfloat16).requires_grad_()))
    off = copy.deepcopy(fused)
    off.fused = False
    assert not _is_fused(off(x.clone().requires_grad_()))


@pytest.mark.parametrize("name", ["ema", "ema-no-warm-start", "renorm-warming-up"])
def test_float32_far_from_zero_matches_float64(name: str) -> None:
    """A float32 stream whose mean is 1e4 standard deviations from zero. The statistics are taken
    relative to the first row, so nothing cancels: the fused float32 layer stays as close to the
    float64 reference on the same numbers as the float32 reference path (float64 sums) does. What
    is left is the rounding of the float32 running mean (a unit in the last place of 5e3 is 1e-3
    standard deviations), on both paths."""
    fused32, _ = _pair(LAYERS[name], torch.float32)
    reference32 = copy.deepcopy(fused32)
    reference32.fused = False
    reference64 = copy.deepcopy(reference32).double()
    gen = torch.Generator().manual_seed(5)
    for n in [64, 1, 8, 1, 256, 2]:
        x = torch.randn(n, C, generator=gen) * 0.5 + 5e3
        g = torch.randn(n, C, generator=gen, dtype=torch.float64)
        results = []
        for layer, inp in ((fused32, x), (reference32, x), (reference64, x.double())):
            inp = inp.clone().requires_grad_()
            y = layer(inp)
            (y * g.to(y.dtype)).sum().backward()
            assert inp.grad is not None
            moments = (layer.running_mean.double(), layer.running_var.double())
            results.append((y.detach().double(), inp.grad.double(), *moments))
        fused, ref32, exact = results
        torch.testing.assert_close(fused[0], exact[0], rtol=0, atol=2e-3)
        torch.testing.assert_close(fused[1], exact[1], rtol=0, atol=1e-2)
        torch.testing.assert_close(fused[2], exact[2], rtol=2e-7, atol=0)
        torch.testing.assert_close(fused[3], exact[3], rtol=1e-4, atol=0)
        torch.testing.assert_close(fused[3], ref32[3], rtol=1e-5, atol=0)


def test_running_buffers_survive_two_forwards_before_backward() -> None:
    """Gradient accumulation over two forward calls: each backward uses its own statistics, not
    the buffers as the second forward left them."""
    fused, reference = _pair(LAYERS["ema-no-warm-start"], torch.float64)
    gen = torch.Generator().manual_seed(6)
    x1, x2 = (torch.randn(n, C, generator=gen, dtype=torch.float64) for n in (4, 3))
    grads = []
    for layer in (fused, reference):
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        (layer(a).pow(3).sum() + layer(b).pow(2).sum()).backward()
        grads.append((a.grad, b.grad, [p.grad for p in layer.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_second_order_gradient_needs_the_reference_path() -> None:
    layer = EMABatchNorm(C).double()
    layer(torch.randn(5, C, dtype=torch.float64))
    x = torch.randn(3, C, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="fused = False"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    layer.fused = False
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    gx.sum().backward()  # the reference path is differentiable twice
    assert x.grad is not None


def test_input_without_grad_and_frozen_affine() -> None:
    """Only the gradients that are asked for (raw inputs do not require grad)."""
    fused, reference = _pair(LAYERS["renorm-clipped"], torch.float64)
    for layer in (fused, reference):
        layer.weight.requires_grad_(False)  # type: ignore[union-attr]
    x = torch.randn(9, C, dtype=torch.float64)
    outs = []
    for layer in (fused, reference):
        y = layer(x)
        y.pow(2).sum().backward()
        outs.append((y.detach(), layer.bias.grad))  # type: ignore[union-attr]
        assert layer.weight.grad is None  # type: ignore[union-attr]
    torch.testing.assert_close(outs[0], outs[1])


def test_non_contiguous_input_and_gradient() -> None:
    fused, reference = _pair(LAYERS["ema"], torch.float64)
    base = torch.randn(C, 12, dtype=torch.float64)
    for cols in (slice(0, 1), slice(0, 12, 2)):  # (1, C) and (6, C) transposed views
        xa = base[:, cols].t().detach().requires_grad_()
        xb = base[:, cols].t().detach().requires_grad_()
        assert not xa.is_contiguous() or xa.shape[0] == 1
        ya, yb = fused(xa), reference(xb)
        torch.testing.assert_close(ya, yb)
        ya.sum().backward()  # an expanded (stride 0) upstream gradient
        yb.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(fused.running_var, reference.running_var)


def test_model_trains_identically_with_and_without_fusion() -> None:
    """A few optimizer steps of a small model: the same losses either way."""
    losses = []
    for fused_flag in (True, False):
        torch.manual_seed(8)
        model = nn.Sequential(nn.Linear(6, C), EMABatchNorm(C), nn.ReLU(), nn.Linear(C, 1))
        model = model.double()
        model[1].fused = fused_flag
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(9)
        run = []
        for n in (1, 4, 1, 16, 2, 1):
            x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)


def test_parametrized_weight_is_used() -> None:
    """A parametrized ``weight`` (no longer in ``_parameters``) still reaches the fused path."""

    class Doubled(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2.0 * w

    fused, reference = _pair(LAYERS["ema"], torch.float64)
    for layer in (fused, reference):
        nn.utils.parametrize.register_parametrization(layer, "weight", Doubled())
    x = torch.randn(6, C, dtype=torch.float64)
    ya, yb = fused(x.clone().requires_grad_()), reference(x.clone().requires_grad_())
    assert _is_fused(ya)
    torch.testing.assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    grads = [layer.parametrizations.weight.original.grad for layer in (fused, reference)]
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["ema", "ema-no-affine", "renorm-no-affine"])
def test_output_may_be_modified_in_place(name: str) -> None:
    """An in-place op after the layer (``ReLU(inplace=True)``) leaves the backward intact."""
    fused, reference = _pair(LAYERS[name], torch.float64)
    x = torch.randn(7, C, dtype=torch.float64)
    grads = []
    for layer in (fused, reference):
        inp = x.clone().requires_grad_()
        nn.functional.relu(layer(inp), inplace=True).pow(2).sum().backward()
        grads.append(inp.grad)
    torch.testing.assert_close(grads[0], grads[1])
