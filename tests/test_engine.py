"""The compiled engine (stream_trainer.engine) against the autograd reference: autograd through
the same model, ``clip_grad_norm_`` and PyTorch's fused Adam / AdamW; stacked members against
separately trained models; and the trainer's use of it."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stream_trainer.engine.compiled import CompiledEngine
from stream_trainer.model import StreamMLP
from stream_trainer.records import Record
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from stream_trainer.training.mixture import softmax64

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = [1, 2, 5, 1, 64, 3, 1, 300, 17, 1, 1]
NORMS = ["ema_batch", "batch_renorm", "layer", "none"]
# batch_renorm's clip limits warm up within the test's first 40 samples, so r and d take effect
RENORM = {"batch_renorm": {"warmup_start_samples": 0, "warmup_end_samples": 40}}
ACTIVATIONS = ["relu", "gelu", "tanh", "silu"]
TOL = {
    torch.float32: {"rtol": 2e-4, "atol": 2e-5},
    torch.float64: {"rtol": 1e-9, "atol": 1e-11},
}


def _model(
    norm: str,
    activation: str,
    skip: bool,
    dtype: torch.dtype,
    out: int,
    options: dict[str, dict[str, Any]] = RENORM,
) -> StreamMLP:
    torch.manual_seed(0)
    model = StreamMLP(
        6, out, hidden=(16, 8), norm=norm, norm_options=options, activation=activation, skip=skip
    )
    model = model.to(dtype)
    with torch.no_grad():  # non-trivial affine parameters and a non-zero skip path
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.train()


def _adam(model: StreamMLP, kind: str, weight_decay: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=0.01, weight_decay=weight_decay, fused=True)


def _reference_step(
    model: StreamMLP,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    regression: bool,
    max_norm: float | None,
) -> float:
    out = model(x)
    loss = F.mse_loss(out, y) if regression else F.cross_entropy(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    return loss.item()


def _batch(gen: torch.Generator, n: int, dtype: torch.dtype, regression: bool) -> tuple[Any, Any]:
    x = (torch.randn(n, 6, generator=gen) * 2 + 0.5).to(dtype)
    if regression:
        return x, torch.randn(n, 1, generator=gen).to(dtype)
    return x, torch.randint(0, 3, (n,), generator=gen)


def _sync(model: StreamMLP, opt: Any, ref: StreamMLP, ref_opt: Any) -> None:
    """Copy the reference's parameters, buffers and Adam state into ``model`` in place."""
    model.load_state_dict(ref.state_dict())
    for p, p_ref in zip(model.parameters(), ref.parameters(), strict=True):
        for key, value in ref_opt.state[p_ref].items():
            opt.state[p][key].copy_(value)


def _assert_same_state(
    model: StreamMLP,
    opt: torch.optim.Optimizer,
    ref: StreamMLP,
    ref_opt: Any,
    tol: Any,
    at: str,
    noise_driven: tuple[str, ...] = (),
) -> None:
    """Parameters, gradients, Adam state and buffers equal to ``tol``; a parameter in
    ``noise_driven`` (gradient zero in exact arithmetic) only to one Adam step (lr 0.01)."""
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters(), strict=True):
        ptol = {"rtol": 0.0, "atol": 0.0101} if name in noise_driven else tol
        torch.testing.assert_close(p.detach(), p_ref.detach(), **ptol, msg=f"{name} {at}")
        assert p.grad is not None and p_ref.grad is not None
        torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=f"grad {name} {at}")
        state, ref_state = opt.state[p], ref_opt.state[p_ref]
        assert float(state["step"]) == float(ref_state["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], ref_state[key], **tol, msg=f"{key} {name} {at}")
    for (name, b), b_ref in zip(model.named_buffers(), ref.buffers(), strict=True):
        if b.is_floating_point():
            torch.testing.assert_close(b, b_ref, **tol, msg=f"{name} {at}")
        else:
            assert torch.equal(b, b_ref), f"{name} {at}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "no-skip"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm", NORMS)
def test_serve_and_learn_equal_the_pytorch_step(
    norm: str, activation: str, skip: bool, dtype: torch.dtype
) -> None:
    _check_against_the_pytorch_step(norm, activation, skip, dtype, RENORM)


@pytest.mark.parametrize(
    ("norm", "options"),
    [
        ("ema_batch", {"affine": False}),
        ("batch_renorm", {"affine": False, "warmup_start_samples": 0, "warmup_end_samples": 0}),
        ("batch_renorm", {"rmax": 1.0, "dmax": 0.0}),
        ("layer", {"affine": False}),
        ("layer", {"bias": False}),
        ("ema_batch", {"warm_start": False, "momentum": 0.1}),
    ],
    ids=lambda v: str(v),
)
def test_norm_options_are_followed(norm: str, options: dict[str, Any]) -> None:
    """Layers without affine parameters or bias, renorm at full clip limits from the start and
    without them, ema_batch without warm start: the same agreement."""
    _check_against_the_pytorch_step(norm, "gelu", True, torch.float64, {norm: options})


def _check_against_the_pytorch_step(
    norm: str,
    activation: str,
    skip: bool,
    dtype: torch.dtype,
    options: dict[str, dict[str, Any]],
) -> None:
    """Over batch sizes 1 to 64: the served output equals the eval-mode forward, and after each
    learn step the parameters, gradients (clipped), Adam moments and step, and running
    statistics equal those of autograd + ``clip_grad_norm_`` + fused Adam, to rounding. The
    optimizer state existed before the step was built (two PyTorch steps first).

    ``batch_renorm`` starts each step from the reference's state, and the biases of the linear
    layers before it are compared to one Adam step: they have a zero gradient in exact arithmetic
    at batch sizes >= 2 (the batch mean is subtracted), so each side's rounding noise there goes
    through Adam's division by its own magnitude. Their gradients still agree to ``tol``."""
    ref = _model(norm, activation, skip, dtype, 3, options)
    ref_opt = _adam(ref, "adam", 0.0)
    gen = torch.Generator().manual_seed(1)
    for n in (3, 1):
        _reference_step(ref, ref_opt, *_batch(gen, n, dtype, False), False, 1.0)
    model, opt = copy.deepcopy(ref), None
    opt = _adam(model, "adam", 0.0)
    opt.load_state_dict(ref_opt.state_dict())
    step = CompiledEngine.build([model], [opt])
    assert step is not None
    tol = TOL[dtype]
    for i, n in enumerate(SIZES):
        x, y = _batch(gen, n, dtype, False)
        if norm == "batch_renorm":
            _sync(model, opt, ref, ref_opt)
        ref.eval()
        with torch.no_grad():
            served = ref(x)
        ref.train()
        assert step.applies(x.numpy())
        torch.testing.assert_close(torch.from_numpy(step.serve(x.numpy())[0]), served, **tol)
        # a small clip norm, so that some steps clip and some do not
        loss_ref = _reference_step(ref, ref_opt, x, y, False, 0.5)
        loss = step.learn(x.numpy(), y.numpy(), regression=False, max_norm=0.5)[0]
        assert loss == pytest.approx(loss_ref, rel=1e-5 if dtype == torch.float32 else 1e-12)
        noisy = ("body.0.bias", "body.3.bias") if norm == "batch_renorm" and n > 1 else ()
        _assert_same_state(model, opt, ref, ref_opt, tol, f"step {i} (n={n})", noisy)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
@pytest.mark.parametrize("norm", NORMS)
def test_regression_weight_decay_and_fresh_optimizer_state(norm: str, kind: str) -> None:
    """Squared error, weight decay (coupled for Adam, decoupled for AdamW), no clipping, and a
    step built before any optimizer step (it creates Adam's state as Adam would)."""
    ref = _model(norm, "gelu", True, torch.float64, 1)
    model = copy.deepcopy(ref)
    ref_opt, opt = _adam(ref, kind, 0.05), _adam(model, kind, 0.05)
    step = CompiledEngine.build([model], [opt])
    assert step is not None
    gen = torch.Generator().manual_seed(2)
    for i, n in enumerate(SIZES):
        x, z = _batch(gen, n, torch.float64, True)
        if norm == "batch_renorm" and i > 0:
            _sync(model, opt, ref, ref_opt)
        loss_ref = _reference_step(ref, ref_opt, x, z, True, None)
        loss = step.learn(x.numpy(), z.numpy(), regression=True, max_norm=None)[0]
        assert loss == pytest.approx(loss_ref, rel=1e-12)
        noisy = ("body.0.bias", "body.3.bias") if norm == "batch_renorm" and n > 1 else ()
        _assert_same_state(model, opt, ref, ref_opt, TOL[torch.float64], f"step {i}", noisy)


def test_the_stacked_layout_keeps_values_and_state_and_shares_memory() -> None:
    model = _model("ema_batch", "gelu", True, torch.float32, 3)
    opt = _adam(model, "adam", 0.0)
    x, y = _batch(torch.Generator().manual_seed(3), 4, torch.float32, False)
    _reference_step(model, opt, x, y, False, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = copy.deepcopy(opt.state_dict())
    step = CompiledEngine.build([model], [opt])
    assert step is not None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    after = opt.state_dict()
    for index, state in opt_before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), (index, key)
    # every parameter, gradient and running statistic is a view of the engine's buffers
    flat = step.params.__array_interface__["data"][0]
    end = flat + step.params.nbytes
    for p in model.parameters():
        assert flat <= p.data_ptr() < end
        assert p.grad is not None
    for _, norm in model.norm_layers():
        assert norm.running_mean is not None and norm.samples_seen is not None
        stats = step.run_mean.__array_interface__["data"][0]
        assert stats <= norm.running_mean.data_ptr() < stats + step.run_mean.nbytes
        seen = step.seen.__array_interface__["data"][0]
        assert seen <= norm.samples_seen.data_ptr() < seen + step.seen.nbytes
    # a change through numpy is a change of the model (and the other way round)
    step.params[:] = 0.0
    assert all(float(p.detach().abs().sum()) == 0.0 for p in model.parameters())
    with torch.no_grad():
        model.head.bias.fill_(2.0)
    assert step.serve(x.numpy())[0].min() >= 2.0 - 1e-6


@pytest.mark.parametrize("norm", NORMS)
def test_stacked_members_equal_separately_trained_models(norm: str) -> None:
    """K = 3 members that differ in learning rate, norm momentum and initial weights, trained in
    the same calls: each one's outputs, losses, parameters, Adam state and statistics equal those
    of the same model trained alone by autograd (to float64 rounding)."""
    members, optimizers, refs, ref_opts = [], [], [], []
    for k, (lr, momentum) in enumerate([(0.01, 0.002), (0.003, 0.03), (0.03, 0.3)]):
        options: dict[str, dict[str, Any]] = {norm: {"momentum": momentum}}
        if norm not in ("ema_batch", "batch_renorm"):
            options = {}
        torch.manual_seed(k)
        model = StreamMLP(6, 3, hidden=(16, 8), norm=norm, norm_options=options, skip=True)
        model = model.double()
        ref = copy.deepcopy(model)
        members.append(model)
        refs.append(ref)
        optimizers.append(torch.optim.Adam(model.parameters(), lr=lr, fused=True))
        ref_opts.append(torch.optim.Adam(ref.parameters(), lr=lr, fused=True))
    engine = CompiledEngine.build(members, optimizers)
    assert engine is not None and engine.members == 3
    gen = torch.Generator().manual_seed(4)
    tol = TOL[torch.float64]
    for i, n in enumerate([1, 4, 1, 1, 9, 2, 1, 30, 1]):
        x, y = _batch(gen, n, torch.float64, False)
        served = engine.serve(x.numpy())
        losses = engine.learn(x.numpy(), y.numpy(), regression=False, max_norm=1.0)
        for k, (model, opt, ref, ref_opt) in enumerate(
            zip(members, optimizers, refs, ref_opts, strict=True)
        ):
            ref.eval()
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(served[k]), ref(x), **tol)
            ref.train()
            loss = _reference_step(ref, ref_opt, x, y, False, 1.0)
            assert losses[k] == pytest.approx(loss, rel=1e-12)
            noisy = ("body.0.bias", "body.3.bias") if norm == "batch_renorm" and n > 1 else ()
            _assert_same_state(model, opt, ref, ref_opt, tol, f"member {k} step {i}", noisy)
            if norm == "batch_renorm":
                _sync(model, opt, ref, ref_opt)


def test_softmax64_equals_torch() -> None:
    logits = np.random.default_rng(4).normal(size=(5, 4)).astype(np.float32) * 30
    expected = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    np.testing.assert_allclose(softmax64(logits), expected, rtol=1e-12, atol=1e-15)


def test_the_vectorized_exp_equals_math_exp_and_gelus_backward_the_float64_one() -> None:
    r"""GELU's float32 backward takes :math:`e^t` as ``m * 2**k`` (kernels._exp_parts): within
    1e-10 of ``math.exp`` over ``[-700, 0]``, and the backward within 2 float32 ulps of its
    formula with ``math.exp``, :math:`dy\,(\Phi(z) + z\,\varphi(z))`."""
    from stream_trainer.engine import kernels

    for t in np.concatenate([np.linspace(-700.0, 0.0, 20001), -np.logspace(-12, 2, 2001)]):
        m, k = kernels._exp_parts(t)
        assert math.ldexp(m, int(k)) == pytest.approx(math.exp(t), rel=1e-10, abs=0.0)
    rng = np.random.default_rng(5)
    z = np.concatenate([np.linspace(-40, 40, 4096), rng.normal(size=4096) * 3])
    z32 = z.astype(np.float32).reshape(-1, 64)
    dy32 = rng.normal(size=z32.shape).astype(np.float32)
    out = np.empty_like(z32)
    kernels._activate_backward(1, dy32, z32, np.empty_like(z32), out)
    expected = np.array(
        [
            float(d)
            * (
                kernels._cdf(float(v), True)
                + float(v) * math.exp(-0.5 * float(v) ** 2) / math.sqrt(2 * math.pi)
            )
            for d, v in zip(dy32.ravel(), z32.ravel(), strict=True)
        ],
        dtype=np.float32,
    ).reshape(z32.shape)
    ulps = np.abs(out.view(np.int32).astype(np.int64) - expected.view(np.int32).astype(np.int64))
    assert ulps.max() <= 2


@pytest.mark.parametrize(
    ("kwargs", "optimizer"),
    [
        ({"norm": "batch"}, "adam"),
        ({"norm": "group"}, "adam"),
        ({"norm": "rms"}, "adam"),
        ({"norm": "online"}, "adam"),
        ({"norm": ("ema_batch", "group")}, "adam"),
        ({"norm": "layer", "dropout": 0.2}, "adam"),
        ({"norm": "ema_batch"}, "sgd"),
        ({"norm": "ema_batch"}, "amsgrad"),
        ({"norm": "ema_batch"}, "two-groups"),
    ],
    ids=lambda v: str(v),
)
def test_what_it_does_not_cover_is_left_alone(kwargs: dict[str, Any], optimizer: str) -> None:
    model = StreamMLP(4, 2, **kwargs)
    params = list(model.parameters())
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    elif optimizer == "amsgrad":
        opt = torch.optim.Adam(params, amsgrad=True)
    elif optimizer == "two-groups":
        opt = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}])
    else:
        opt = torch.optim.Adam(params)
    ptrs = [p.data_ptr() for p in params]
    assert CompiledEngine.build([model], [opt]) is None
    assert [p.data_ptr() for p in params] == ptrs  # nothing was moved


def test_a_norm_with_a_reducer_a_half_model_or_mismatched_members_are_not_covered() -> None:
    model = StreamMLP(4, 2, hidden=(8,), norm="ema_batch")
    (_, norm), *_ = model.norm_layers()
    norm.moment_reducer = lambda count, s1, s2: (count, s1, s2)
    assert CompiledEngine.build([model], [torch.optim.Adam(model.parameters())]) is None
    float16 = StreamMLP(4, 2, hidden=(8,), norm="none").half()
    assert CompiledEngine.build([float16], [torch.optim.Adam(float16.parameters())]) is None
    # members must share the architecture and Adam's betas, eps and weight decay
    a, b = StreamMLP(4, 2, hidden=(8,)), StreamMLP(4, 2, hidden=(16,))
    opts = [torch.optim.Adam(m.parameters()) for m in (a, b)]
    assert CompiledEngine.build([a, b], opts) is None
    c = StreamMLP(4, 2, hidden=(8,))
    opts = [torch.optim.Adam(a.parameters()), torch.optim.Adam(c.parameters(), eps=1e-6)]
    assert CompiledEngine.build([a, c], opts) is None


# ---------------------------------------------------------------------- the trainer's use of it
def _stream(n: int, *, regression: bool = False) -> list[Record]:
    """Two numeric features, a categorical one whose categories and a third class appear
    mid-stream, a numeric feature that appears at record 150: the model grows in both widths."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        x1, x2 = rng.normal(size=2)
        category = "abcd"[i % min(4, 2 + i // 100)]
        value: dict[str, Any] = {"x1": float(x1), "x2": float(x2), "c": category}
        if i >= 150:
            value["x3"] = float(rng.normal())
        if regression:
            value["y"] = float(3 * x1 - x2)
        else:
            value["y"] = int(x1 + 0.5 * x2 > 0) + (2 if i >= 120 and x2 > 1.2 else 0)
        out.append(Record(value))
    return out


def _run(trainer: IncrementalTrainer, records: list[Record], sizes: list[int]) -> None:
    pos = 0
    for size in sizes:
        batch = records[pos : pos + size]
        pos += size
        if batch:
            trainer.step(batch)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_trainer_learns_the_same_with_and_without_it(norm: str, task: str) -> None:
    """Whole prequential runs (batch sizes 1 to 40, a missing label, new classes and features
    mid-stream, so the engine is rebuilt after each growth): the same metrics and weights as
    autograd, to float32 rounding accumulated over the run (``batch_renorm``: its noise-driven
    biases, see above, drift apart, so within a bound)."""
    records = _stream(400, regression=task == "regression")
    records[50] = Record({k: v for k, v in records[50].value.items() if k != "y"})
    sizes = [1, 3, 40, 1, 1, 8, 2, 33, 5, 1, 16] * 10
    trainers = []
    for engine in ("auto", "torch"):
        config = TrainerConfig(target="y", task=task, norm=norm, seed=3, engine=engine)
        trainer = IncrementalTrainer(config)
        _run(trainer, records, sizes)
        trainers.append(trainer)
    fast, slow = trainers
    assert fast._engine is not None and fast._engine.current() and slow._engine is None
    assert fast.model is not None and fast.model.in_features == slow.model.in_features == 7  # type: ignore[union-attr]
    if task == "classification":
        assert fast.classes == slow.classes and len(fast.classes) >= 3
    assert fast.samples_trained == slow.samples_trained == 399
    close = norm != "batch_renorm"  # its noise-driven biases (see the test above) drift apart
    for key, value in slow.metrics().items():
        tol = 1e-3 if close else 0.01
        assert fast.metrics()[key] == pytest.approx(value, rel=tol, abs=tol), key
    tf, ts = fast.state_tensors(), slow.state_tensors()
    assert tf.keys() == ts.keys()
    for key in ts:
        if not key.startswith(("model.", "optim.") if close else "model."):
            continue
        if close:
            torch.testing.assert_close(tf[key], ts[key], rtol=1e-3, atol=1e-4, msg=key)
        else:
            scale = float(ts[key].abs().max()) + 1e-12
            assert float((tf[key] - ts[key]).abs().max()) / scale < 0.08, key


def test_a_restored_trainer_continues_bit_for_bit() -> None:
    """A checkpoint taken mid-stream (tensors and JSON state) restores a trainer whose engine
    steps give exactly the numbers the original's give."""
    records = _stream(300)
    sizes = [1, 2, 7, 1, 1, 30, 1, 4] * 10
    original = IncrementalTrainer(TrainerConfig(target="y", seed=1))
    _run(original, records[:120], sizes)
    assert original._engine is not None
    restored = IncrementalTrainer.from_state(original.state_tensors(), original.state_json())
    for trainer in (original, restored):
        _run(trainer, records[120:], sizes)
    assert restored._engine is not None
    assert original.metrics() == restored.metrics()
    to, tr = original.state_tensors(), restored.state_tensors()
    for key in to:
        assert torch.equal(to[key], tr[key]), key
