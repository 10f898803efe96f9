"""Layer-specific tests of stream_trainer.norms (the registry-wide contract is in
test_norms_contract.py)."""

from __future__ import annotations

import copy
import doctest
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stream_trainer.errors import ConfigError
from stream_trainer.norms import (
    LEGACY_SAMPLES_SEEN,
    BatchNorm,
    BatchRenorm,
    EMABatchNorm,
    NormRegistry,
    OnlineNorm,
    WeightStandardizedLinear,
    build_norm,
    norm_wants_weight_standardization,
)
from stream_trainer.norms._moments import mixture_update, sample_weight, sample_weight_value
from stream_trainer.norms.online import control_process

C = 5
DT = torch.float64


def _x(*shape: int, seed: int = 0, scale: float = 2.0, shift: float = 0.7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=DT) * scale + shift


def _randomize_affine(*modules: nn.Module) -> None:
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


# --------------------------------------------------------------------------- batch vs torch
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("extra", [(), (3,)], ids=["nc", "ncl"])
def test_batch_equals_torch_batchnorm1d(
    momentum: float | None, affine: bool, extra: tuple[int, ...]
) -> None:
    ours = BatchNorm(C, eps=1e-4, momentum=momentum, affine=affine).to(DT)
    ref = nn.BatchNorm1d(C, eps=1e-4, momentum=momentum, affine=affine).to(DT)
    _randomize_affine(ours)
    ref.load_state_dict(ours.state_dict(), strict=False)
    for step, n in enumerate([2, 7, 3, 16, 2, 5]):
        x = _x(n, C, *extra, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb)
        w = _x(*ya.shape, seed=100 + step)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
        for pa, pb in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    ours.eval()
    ref.eval()
    x = _x(4, C, *extra, seed=50)
    torch.testing.assert_close(ours(x), ref(x))


def test_batch_float32_matches_torch_and_survives_large_offsets() -> None:
    ours, ref = BatchNorm(C), nn.BatchNorm1d(C)
    x = torch.randn(32, C) + 3.0
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    # float64 accumulation: a mean 1e4 standard deviations away still normalizes correctly
    x = torch.randn(64, C, generator=torch.Generator().manual_seed(1)) + 1e4
    exact = (x.double() - x.double().mean(0)) / torch.sqrt(x.double().var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(BatchNorm(C)(x).double(), exact, atol=2e-3, rtol=0)


def test_batch_size_one_uses_running_stats_without_update() -> None:
    layer = BatchNorm(C).to(DT)
    layer(_x(6, C))
    state = copy.deepcopy(layer.state_dict())
    x = _x(1, C, seed=3)
    y_train = layer(x)
    for key, value in state.items():
        assert torch.equal(layer.state_dict()[key], value), key
    layer.eval()
    torch.testing.assert_close(y_train, layer(x))


# --------------------------------------------------------------------------- per-sample layers
@pytest.mark.parametrize("extra", [(), (4,)], ids=["nc", "ncl"])
def test_layer_equals_torch_layernorm(extra: tuple[int, ...]) -> None:
    ours = build_norm("layer", C, eps=1e-3).to(DT)
    ref = nn.LayerNorm(C, eps=1e-3).to(DT)
    _randomize_affine(ours)
    ref.load_state_dict(ours.state_dict())
    x = _x(6, C, *extra)
    expected = ref(x) if not extra else ref(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ours(x), expected)


def test_rms_and_group_equal_torch() -> None:
    rms, rms_ref = build_norm("rms", C).to(DT), nn.RMSNorm(C, eps=1e-6).to(DT)
    _randomize_affine(rms)
    rms_ref.load_state_dict(rms.state_dict())
    torch.testing.assert_close(rms(_x(4, C)), rms_ref(_x(4, C)))
    group, group_ref = build_norm("group", 6, num_groups=3).to(DT), nn.GroupNorm(3, 6).to(DT)
    _randomize_affine(group)
    group_ref.load_state_dict(group.state_dict())
    for shape in [(4, 6), (4, 6, 5), (1, 6, 3)]:
        x = _x(*shape)
        expected = group_ref(x if len(shape) == 3 else x.unsqueeze(-1)).reshape(shape)
        torch.testing.assert_close(group(x), expected)


def test_group_rejects_indivisible_features() -> None:
    with pytest.raises(ConfigError, match=r"num_features=6.*num_groups=4.*\[1, 2, 3, 6\]"):
        build_norm("group", 6, num_groups=4)


def test_weight_standardized_linear() -> None:
    layer = WeightStandardizedLinear(7, 3).to(DT)
    w = layer.standardized_weight()
    torch.testing.assert_close(w.mean(1), torch.zeros(3, dtype=DT))
    torch.testing.assert_close(w.var(1, unbiased=False), torch.ones(3, dtype=DT), atol=1e-3, rtol=0)
    weight = layer.weight.detach().clone().requires_grad_()
    x = _x(4, 7).requires_grad_()
    fn = lambda inp, wt: torch.func.functional_call(layer, {"weight": wt}, (inp,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight))
    assert norm_wants_weight_standardization("group")
    assert not norm_wants_weight_standardization("group", {"weight_standardization": False})
    assert not norm_wants_weight_standardization("batch")
    assert build_norm("group", 8).wants_weight_standardization
    with pytest.raises(ConfigError, match="valid names"):
        norm_wants_weight_standardization("nope")


# --------------------------------------------------------------------------- sample-counted moments
def _weighted_moments(
    mean0: torch.Tensor, var0: torch.Tensor, w0: float, rows: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the mixture: old distribution (w0) + point masses rows (w)."""
    mean = w0 * mean0 + (w[:, None] * rows).sum(0)
    second = w0 * (var0 + mean0**2) + (w[:, None] * rows**2).sum(0)
    return mean, second - mean**2


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), m=st.floats(0.001, 0.9), seed=st.integers(0, 10_000))
def test_ema_batch_update_is_the_documented_mixture(n: int, m: float, seed: int) -> None:
    layer = EMABatchNorm(C, momentum=m, warm_start=False).to(DT)
    with torch.no_grad():
        layer.running_mean.copy_(_x(C, seed=seed))
        layer.running_var.copy_(_x(C, seed=seed + 1).abs())
    mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()
    rows = _x(n, C, seed=seed + 2)
    batch, single = copy.deepcopy(layer), copy.deepcopy(layer)
    batch(rows)
    for i in range(n):
        single(rows[i : i + 1])
    keep = (1 - m) ** n  # weight left on the past: the same for both (momentum counts samples)
    exp_batch = _weighted_moments(
        mean0, var0, keep, rows, torch.full((n,), (1 - keep) / n, dtype=DT)
    )
    geometric = torch.tensor([m * (1 - m) ** (n - 1 - i) for i in range(n)], dtype=DT)
    exp_single = _weighted_moments(mean0, var0, keep, rows, geometric)
    torch.testing.assert_close(batch.running_mean, exp_batch[0])
    torch.testing.assert_close(batch.running_var, exp_batch[1])
    torch.testing.assert_close(single.running_mean, exp_single[0])
    torch.testing.assert_close(single.running_var, exp_single[1])
    # identical rows: one batch of n equals n batches of one, mean and variance
    same, same_single = copy.deepcopy(layer), copy.deepcopy(layer)
    same(rows[:1].expand(n, C))
    for _ in range(n):
        same_single(rows[:1])
    torch.testing.assert_close(same.running_mean, same_single.running_mean)
    torch.testing.assert_close(same.running_var, same_single.running_var)
    assert int(batch.samples_seen) == int(single.samples_seen) == n


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8), seed=st.integers(0, 10_000))
def test_warm_start_gives_exact_cumulative_moments(sizes: list[int], seed: int) -> None:
    total = sum(sizes)
    for layer in (EMABatchNorm(C, momentum=0.01), BatchRenorm(C, momentum=0.01)):
        layer = layer.to(DT)  # total <= 72 < 1 / 0.01: warm start rules throughout
        rows = _x(total, C, seed=seed)
        start = 0
        for n in sizes:
            layer(rows[start : start + n])
            start += n
        # pooled moments; a lone first sample is pooled half and half with the initial (0, 1)
        weights = torch.ones(total, dtype=DT)
        prior = 0.0
        if sizes[0] == 1:
            weights[0], prior = 0.5, 0.5
        mean = (weights[:, None] * rows).sum(0) / total
        second = ((weights[:, None] * rows * rows).sum(0) + prior) / total
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, second - mean * mean)
        if sizes[0] > 1:  # exactly the cumulative moments
            torch.testing.assert_close(layer.running_var, rows.var(0, unbiased=False))
        assert int(layer.samples_seen) == total


def test_sample_weight_counts_samples() -> None:
    count = torch.full((C,), 4.0, dtype=DT)
    seen = torch.tensor(10_000)
    a4 = sample_weight(count, seen, 0.1, warm_start=True)
    torch.testing.assert_close(a4, torch.full((C,), 1 - 0.9**4, dtype=DT))
    a1 = sample_weight(count / 4, torch.tensor(0), 0.1, warm_start=True)
    torch.testing.assert_close(a1, torch.full((C,), 0.5, dtype=DT))  # a lone first sample
    first4 = sample_weight(count, torch.tensor(0), 0.1, warm_start=True)
    torch.testing.assert_close(first4, torch.ones(C, dtype=DT))  # a first batch: its own moments
    assert sample_weight_value(1, 0, 0.1, warm_start=True) == 0.5
    assert sample_weight_value(4, 0, 0.1, warm_start=True) == 1.0
    assert sample_weight_value(1, 1, 0.1, warm_start=True) == 0.5
    mean, var = mixture_update(
        torch.zeros(1, dtype=DT), torch.ones(1, dtype=DT), torch.tensor([2.0], dtype=DT),
        torch.zeros(1, dtype=DT), torch.tensor([0.1], dtype=DT),
    )  # fmt: skip
    torch.testing.assert_close(mean, torch.tensor([0.2], dtype=DT))
    torch.testing.assert_close(var, torch.tensor([0.9 * (1 + 0.1 * 4.0)], dtype=DT))


def test_ema_batch_first_batch_is_batch_norm_and_eval_uses_running_stats() -> None:
    ema, bn = EMABatchNorm(C).to(DT), BatchNorm(C).to(DT)
    x = _x(9, C)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ema(xa), bn(xb)  # a = 1 on the first batch: identical, gradient included
    torch.testing.assert_close(ya, yb)
    ya.pow(3).sum().backward()
    yb.pow(3).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    ema.eval()
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(ema(x), expected)


# --------------------------------------------------------------------------- batch renorm
def test_batch_renorm_without_clipping_range_equals_batch_in_training() -> None:
    renorm = BatchRenorm(C, rmax=1.0, dmax=0.0, warmup_start_samples=0, warmup_end_samples=0)
    renorm, bn = renorm.to(DT), BatchNorm(C).to(DT)
    _randomize_affine(renorm)
    bn.load_state_dict(renorm.state_dict(), strict=False)
    for step, n in enumerate([2, 9, 3, 33, 4]):
        x = _x(n, C, 2, seed=step) if step % 2 else _x(n, C, seed=step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = renorm(xa), bn(xb)
        torch.testing.assert_close(ya, yb)
        ya.pow(3).sum().backward()
        yb.pow(3).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)


def test_batch_renorm_clipping_warmup_and_batch_size_one() -> None:
    layer = BatchRenorm(C, warmup_start_samples=10, warmup_end_samples=30).to(DT)
    with torch.no_grad():
        layer.samples_seen.fill_(20)
    rmax, dmax = layer.clip_limits()
    assert float(rmax) == pytest.approx(2.0) and float(dmax) == pytest.approx(2.5)
    layer.samples_seen.fill_(1000)
    with torch.no_grad():  # running moments far from the batch: r and d saturate
        layer.running_mean.fill_(-50.0)
        layer.running_var.fill_(1e-2)
    x = _x(6, C)
    mu_b, sd_b = x.mean(0), torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    expected = (x - mu_b) / sd_b * 3.0 + 5.0
    torch.testing.assert_close(copy.deepcopy(layer)(x), expected)

    def fn(inp: torch.Tensor) -> torch.Tensor:  # saturated r, d are constants: exact gradient
        return copy.deepcopy(layer)(inp)

    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),))
    # batch size 1: unclipped limit with the running moments, and the moments still move
    x1 = _x(1, C, seed=7)
    mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()
    y1 = layer(x1)
    torch.testing.assert_close(y1, (x1 - mean0) / torch.sqrt(var0 + 1e-5))
    assert not torch.equal(layer.running_mean, mean0)
    assert int(layer.samples_seen) == 1001


# --------------------------------------------------------------------------- online
def test_online_forward_uses_pre_batch_moments_and_paper_update() -> None:
    layer = OnlineNorm(C, momentum=0.05, ecm="none").to(DT)
    _randomize_affine(layer)
    x = _x(4, C)
    before = copy.deepcopy(layer)
    y = layer(x)
    for i in range(4):  # each row's output is independent of the rest of its batch
        torch.testing.assert_close(y[i : i + 1], copy.deepcopy(before)(x[i : i + 1]))
    # n batches of one follow the paper's per-sample recursion (alpha = 1 - momentum)
    seq = copy.deepcopy(before)
    mu, var = torch.zeros(C, dtype=DT), torch.ones(C, dtype=DT)
    for i in range(4):
        seq(x[i : i + 1])
        var = 0.95 * var + 0.95 * 0.05 * (x[i] - mu) ** 2
        mu = 0.95 * mu + 0.05 * x[i]
    torch.testing.assert_close(seq.running_mean, mu)
    torch.testing.assert_close(seq.running_var, var)


def test_online_controlled_backward_is_deterministic_and_exact_for_fresh_single_sample() -> None:
    layer = OnlineNorm(C).to(DT)

    def fn(inp: torch.Tensor) -> torch.Tensor:
        return copy.deepcopy(layer)(inp)

    # zero control state and one sample: the control changes nothing, gradcheck applies
    assert torch.autograd.gradcheck(fn, (_x(1, C, scale=0.5).requires_grad_(),))
    layer(_x(6, C, scale=0.5)).sum().backward()
    x = _x(5, C, seed=1, scale=0.5).requires_grad_()
    out = layer(x)
    g = _x(5, C, seed=2)
    first = torch.autograd.grad(out, x, g, retain_graph=True)[0]
    state = (layer.control_u.clone(), layer.control_v.clone())
    second = torch.autograd.grad(out, x, g)[0]
    assert torch.equal(first, second)  # a function of the state saved at forward time
    assert torch.equal(state[0], layer.control_u) and torch.equal(state[1], layer.control_v)


def test_online_control_process_removes_gradient_mean_and_correlation() -> None:
    gen = torch.Generator().manual_seed(0)
    results = {}
    for control in (True, False):
        layer = OnlineNorm(3, ecm="none", affine=False, backward_control=control).to(DT)
        total_grad, total_corr, rows = torch.zeros(3, dtype=DT), torch.zeros(3, dtype=DT), 0
        g_gen = torch.Generator().manual_seed(1)
        for _ in range(600):
            n = int(torch.randint(1, 9, (1,), generator=gen))
            x = torch.randn(n, 3, generator=gen, dtype=DT).requires_grad_()
            y = layer(x)
            # output gradient with a mean (1.0) and a component along y (0.5)
            g = 1.0 + 0.5 * y.detach() + torch.randn(n, 3, generator=g_gen, dtype=DT)
            y.backward(g)
            assert x.grad is not None
            total_grad += x.grad.sum(0)
            total_corr += (x.grad * y.detach()).sum(0)
            rows += n
        results[control] = (total_grad / rows, total_corr / rows, layer, rows)
    plain_mean, plain_corr, _, _ = results[False]
    ctrl_mean, ctrl_corr, ctrl, rows = results[True]
    assert (plain_mean.abs() > 0.7).all() and (plain_corr.abs() > 0.3).all()
    # sum_t dL/dx_t = u_T - u_0 exactly: the time-averaged gradient mean decays like 1/T
    torch.testing.assert_close(ctrl_mean * rows, ctrl.control_u)
    assert (ctrl_mean.abs() < 0.1 * plain_mean.abs()).all()
    assert (ctrl_corr.abs() < 0.1 * plain_corr.abs()).all()


def test_control_process_single_step_formula() -> None:
    g, y = _x(1, C, seed=1), _x(1, C, seed=2)
    scale, u, v = _x(C, seed=3).abs() + 0.5, _x(C, seed=4), _x(C, seed=5)
    grad_in, u1, v1 = control_process(g, y, scale, u, v, 0.1)
    g_tilde = g[0] - 0.1 * v * y[0]
    torch.testing.assert_close(v1, v + g_tilde * y[0])
    torch.testing.assert_close(grad_in[0], g_tilde / scale - 0.1 * u)
    torch.testing.assert_close(u1, u + grad_in[0])


# --------------------------------------------------------------------------- reducer hook
@pytest.mark.parametrize("name", ["batch", "ema_batch", "batch_renorm"])
def test_moment_reducer_synchronizes_statistics(name: str) -> None:
    """Two simulated processes: each reducer adds the other shard's sums (an all-reduce)."""
    full = _x(10, C)
    shard_a, shard_b = full[:4], full[4:]

    def reducer(
        count: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return count + len(shard_b), s1 + shard_b.sum(0), s2 + (shard_b * shard_b).sum(0)

    synced, reference = build_norm(name, C).to(DT), build_norm(name, C).to(DT)
    synced.moment_reducer = reducer
    y_sync = synced(shard_a)
    y_ref = reference(full)[:4]
    torch.testing.assert_close(y_sync, y_ref)
    torch.testing.assert_close(synced.running_mean, reference.running_mean)
    torch.testing.assert_close(synced.running_var, reference.running_var)
    assert int(synced.samples_seen) == int(reference.samples_seen) == 10


# --------------------------------------------------------------------------- config, checkpoints
@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("ema_batch", {"momentum": 0.0}, r"momentum must be in \(0, 1\], got 0.0"),
        ("batch", {"momentum": 1.5}, r"got 1.5"),
        ("online", {"control_momentum": "x"}, r"got 'x'"),
        ("layer", {"eps": -1.0}, r"got -1.0"),
        ("online", {"ecm": "clip"}, r"got 'clip'"),
        ("batch_renorm", {"rmax": 0.5}, r"got 0.5"),
        ("batch_renorm", {"warmup_start_samples": 9, "warmup_end_samples": 3}, r"=9.*=3"),
        ("ema_batch", {"warm_start": 1}, r"got 1"),
    ],
)
def test_invalid_option_values_quote_the_value(
    name: str, options: dict[str, object], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build_norm(name, C, **options)


def test_invalid_num_features_and_registry_rules() -> None:
    with pytest.raises(ConfigError, match="got 0"):
        build_norm("layer", 0)
    registry = NormRegistry.with_builtins()
    registry.register("ema_fast", lambda c, **kw: EMABatchNorm(c, momentum=0.2, **kw))
    assert registry.names()[-1] == "ema_fast"
    assert registry.build("ema_fast", 3).momentum == 0.2
    with pytest.raises(ConfigError, match="already registered"):
        registry.register("layer", BatchNorm)
    with pytest.raises(ConfigError, match="unknown option"):
        registry.build("none", 3, eps=1e-3)


@pytest.mark.parametrize("name", ["batch", "ema_batch", "batch_renorm", "online"])
def test_old_checkpoint_without_samples_seen_loads(name: str) -> None:
    layer = build_norm(name, C)
    layer(torch.randn(4, C))
    state = layer.state_dict()
    del state["samples_seen"]
    state._metadata[""] = {}  # type: ignore[attr-defined]  # written before versioning
    fresh = build_norm(name, C)
    fresh.load_state_dict(state)
    assert int(fresh.samples_seen) == LEGACY_SAMPLES_SEEN
    assert torch.equal(fresh.running_mean, layer.running_mean)
    assert fresh.state_dict()._metadata[""]["version"] == 1  # type: ignore[attr-defined]


def test_torch_batchnorm_checkpoint_loads_into_batch() -> None:
    ref = nn.BatchNorm1d(C)
    ref(torch.randn(8, C))
    ours = BatchNorm(C)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    ref.eval()
    x = torch.randn(3, C)
    torch.testing.assert_close(ours(x), ref(x))


def test_batch_without_running_stats() -> None:
    layer = BatchNorm(C, track_running_stats=False).to(DT)
    assert not layer.has_running_stats and layer.running_moments() is None
    assert layer.running_mean is None and "running_mean" in layer._buffers
    _randomize_affine(layer)
    assert layer.bias is not None
    torch.testing.assert_close(layer(_x(1, C))[0], layer.bias.detach())  # n = 1: y = beta
    layer.eval()
    x = _x(6, C)
    torch.testing.assert_close(
        layer(x), nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True)
    )


@pytest.mark.parametrize(
    "module",
    ["", ".batch", ".registry", ".weight_standardization"],
)
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module("stream_trainer.norms" + module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
