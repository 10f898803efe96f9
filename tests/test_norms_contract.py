"""Contract suite generated over the norm registry: every registered layer passes every check.

The suite is parametrized over :func:`registered_norm_names` at collection time, so a layer added
with ``register_norm`` (or to the built-ins) is tested automatically. Per-layer exceptions are
explicit and carry a reason (see ``_GRADCHECK_OPTIONS``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stream_trainer.errors import ConfigError
from stream_trainer.norms import NORM_NAMES, StreamNorm, build_norm, registered_norm_names

NAMES = registered_norm_names()
C = 8

# Layers whose training backward is not the Jacobian of their training forward by design get
# gradcheck'ed with options that make it exact; the reason is part of the contract.
_GRADCHECK_OPTIONS: dict[str, tuple[dict[str, object], str]] = {
    "online": (
        {"backward_control": False},
        "the backward control process replaces the gradient on purpose (tested numerically in "
        "test_norms.py); without it the backward is the exact g / s",
    ),
    "batch_renorm": (
        {"rmax": 1.0, "dmax": 0.0},
        "r and d are detached as in Ioffe (2017), so the gradient is exact only while they are "
        "constant (rmax=1, dmax=0, or both clipped: tested in test_norms.py)",
    ),
}


def _layer(name: str, dtype: torch.dtype = torch.float32, **options: object) -> StreamNorm:
    torch.manual_seed(0)
    layer = build_norm(name, C, **options).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _warm(layer: StreamNorm, dtype: torch.dtype, sizes: tuple[int, ...] = (5, 1, 7)) -> None:
    gen = torch.Generator().manual_seed(1)
    layer.train()
    for n in sizes:
        x = (2.0 * torch.randn(n, C, generator=gen) + 0.5).to(dtype).requires_grad_()
        layer(x).pow(2).sum().backward()
    layer.zero_grad()


def _buffers(layer: nn.Module) -> dict[str, torch.Tensor | None]:
    return {k: (None if v is None else v.clone()) for k, v in layer._buffers.items()}


def test_builtins_registered() -> None:
    assert set(NORM_NAMES) <= set(NAMES)
    assert NORM_NAMES == (
        "batch",
        "ema_batch",
        "batch_renorm",
        "layer",
        "group",
        "rms",
        "online",
        "none",
    )


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build_norm("batchnorm", C)
    for name in NAMES:
        assert repr(name) in str(info.value) or name in str(info.value)
    assert info.value.retriable is False


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="no_such_option"):
        build_norm(name, C, no_such_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_declares_flags(name: str) -> None:
    layer = build_norm(name, C)
    assert isinstance(layer, StreamNorm)
    assert isinstance(layer.has_running_stats, bool)
    assert isinstance(layer.exact_training_gradient, bool)
    if not layer.exact_training_gradient:
        assert name in _GRADCHECK_OPTIONS, f"{name}: inexact gradient needs a reason"
    moments = layer.running_moments()
    if layer.has_running_stats:
        assert moments is not None and moments[0].shape == moments[1].shape == (C,)
        assert layer.samples_seen.dtype == torch.int64
    else:
        assert moments is None


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, C), (5, C), (3, C, 2)], ids=["n1", "n5", "ncl"])
def test_gradcheck_train_and_eval(name: str, shape: tuple[int, ...]) -> None:
    options, _reason = _GRADCHECK_OPTIONS.get(name, ({}, ""))
    template = _layer(name, torch.float64, **options)
    assert template.exact_training_gradient
    _warm(template, torch.float64)
    gen = torch.Generator().manual_seed(2)
    x = (1.5 * torch.randn(*shape, generator=gen, dtype=torch.float64) + 0.3).requires_grad_()
    params = list(template.parameters())

    names = [n for n, _ in template.named_parameters()]

    for training in (True, False):

        def fn(inp: torch.Tensor, *ps: torch.Tensor, training: bool = training) -> torch.Tensor:
            layer = copy.deepcopy(template)  # the forward mutates buffers: start each call equal
            layer.train(training)
            return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (inp,))

        inputs = (x, *[p.detach().clone().requires_grad_() for p in params])
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_streaming_training_with_mixed_batch_sizes(name: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, C), build_norm(name, C), nn.ReLU(), nn.Linear(C, 1))
    norm = model[1]
    assert isinstance(norm, StreamNorm)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(4)
    w_true = torch.randn(6, 1, generator=gen)
    sizes = torch.randint(1, 65, (40,), generator=gen).tolist()
    sizes[::3] = [1] * len(sizes[::3])  # a third of the steps have batch size 1
    for n in sizes:
        x = torch.randn(n, 6, generator=gen) * 3.0 + 1.0
        y = x @ w_true
        model.eval()
        with torch.no_grad():
            pred = model(x)  # prequential: predict, then learn
        assert torch.isfinite(pred).all()
        model.train()
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        moments = norm.running_moments()
        if moments is not None:
            assert torch.isfinite(moments[0]).all() and torch.isfinite(moments[1]).all()
            assert (moments[1] >= 0).all()
    if norm.has_running_stats:
        assert int(norm.samples_seen) > 0


@pytest.mark.parametrize("name", NAMES)
def test_batch_size_one_trains(name: str) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, C), build_norm(name, C), nn.ReLU(), nn.Linear(C, 1))
    model.train()
    for n in (4, 1, 1):  # warm, then two single samples
        model.zero_grad()
        before = [p.detach().clone() for p in model.parameters()]
        out = model(torch.randn(n, 6) + 0.5)
        out.sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(bool(g.abs().sum() > 0) for g in grads if g is not None)
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.01 * p.grad)  # type: ignore[operator]
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(10, C), (6, C, 3)], ids=["nc", "ncl"])
def test_eval_is_deterministic_and_batch_independent(name: str, shape: tuple[int, ...]) -> None:
    layer = _layer(name)
    _warm(layer, torch.float32)
    layer.eval()
    x = torch.randn(*shape) * 2.0 + 1.0
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out, layer(x))
        # Every registered layer serves a sample independently of its batch: the product's
        # train/serve contract, so a layer declaring otherwise fails here.
        assert layer.batch_independent_in_eval, f"{name} declares batch_independent_in_eval=False"
        for i in range(shape[0]):
            alone = layer(x[i : i + 1])
            torch.testing.assert_close(alone[0], out[i], rtol=0, atol=1e-6)
            mixed = layer(torch.cat([torch.randn(3, *shape[1:]) * 50, x[i : i + 1]]))
            torch.testing.assert_close(mixed[-1], out[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_reset_running_stats_restores_initial_buffers(name: str) -> None:
    layer = _layer(name)
    initial = _buffers(layer)
    initial_params = {k: v.clone() for k, v in build_norm(name, C).state_dict().items()}
    _warm(layer, torch.float32)
    layer.reset_running_stats()
    after = _buffers(layer)
    assert after.keys() == initial.keys()
    for key, value in initial.items():
        got = after[key]
        assert (value is None and got is None) or (
            value is not None and got is not None and torch.equal(value, got)
        ), key
    layer.reset_parameters()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, initial_params[key]), key


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    layer = _layer(name)
    _warm(layer, torch.float32, sizes=(6, 1, 3, 9))
    fresh = build_norm(name, C)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(7, C) + 0.2
    for module in (layer, fresh):
        module.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(x))
    # One more training step on both: same outputs, gradients and buffers.
    outs = []
    for module in (layer, fresh):
        module.train()
        inp = x.clone().requires_grad_()
        out = module(inp)
        out.pow(2).sum().backward()
        outs.append((out.detach(), inp.grad, _buffers(module)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    for key, value in outs[0][2].items():
        other = outs[1][2][key]
        assert (value is None and other is None) or torch.equal(value, other), key  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_rejects_wrong_feature_count(name: str) -> None:
    with pytest.raises(ValueError, match=str(C)):
        build_norm(name, C)(torch.randn(3, C + 1))
