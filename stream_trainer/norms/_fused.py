r"""Fused training forward and backward of :class:`~stream_trainer.norms.batch.EMABatchNorm` and
:class:`~stream_trainer.norms.batch.BatchRenorm` (the common single-process case).

The reference implementation in :mod:`stream_trainer.norms.batch` builds the training forward from
about thirty differentiable ops (float64 sums, the mixture update, the normalization) and lets
autograd differentiate it. At the sizes of a streaming step the cost is the number of ops and
Python calls, not arithmetic, so here the same function is computed in about fifteen ops inside one
:class:`torch.autograd.Function` (the statistics and the in-place update of the running buffers run
in its forward, where autograd is off) and differentiated by hand in about five.

**Statistics.** With :math:`x_0` the first row of the batch (per feature) as a shift,
:math:`x_s = x - x_0`, the batch mean and biased variance are taken from :math:`x_s` by PyTorch's
two-pass batch-norm statistics kernel (the mean, then the mean squared deviation from it) in the
input dtype: :math:`\mu_B = x_0 + \overline{x_s}`, :math:`\sigma_B^2 = \operatorname{var}(x_s)`.
The shift removes the offset of the data (:math:`x - x_0` is exact for rows within a factor 2 of
each other, and :math:`|x_0 - \mu_B| \le \sqrt{n}\,\sigma_B`), so the rounding error of
:math:`\sigma_B^2` is a few units of the dtype's precision *relative to* :math:`\sigma_B^2`
whatever :math:`|\mu_B| / \sigma_B`: a float32 mean :math:`10^4` standard deviations from zero
loses nothing, as with the reference's float64 sums. The mixture update and the centring are done
relative to the same shift (:math:`\hat\mu - x_0`: differences of nearby numbers) in the input
dtype, so the stored moments agree with the float64 reference to a few units in the last place.

**Output.** :math:`y = \gamma\,(r \hat x + d) + \beta` with :math:`\hat x = (x - c)\,s` for
per-feature :math:`c, s` and detached per-feature :math:`r, d` (absent: 1 and 0).

**Gradient.** For ``ema_batch``, :math:`c = \mu'` and :math:`s = 1/\sqrt{\sigma'^2 + \epsilon}`
with the mixture moments of the weight :math:`a`, :math:`r = 1, d = 0`. The old moments are
constants, so :math:`\partial\mu'/\partial x_i = a/n` and
:math:`\partial\sigma'^2/\partial x_i = (2a/n)(x_i - \mu')`; with :math:`g = \partial L/\partial y`,

.. math::

    \frac{\partial L}{\partial x} = \gamma r s\Big(g - \frac{a}{n}\sum g
        - \frac{a}{n}\hat x \sum g\,\hat x\Big),
    \qquad \frac{\partial L}{\partial\gamma} = r\sum g\,\hat x + d\sum g,
    \qquad \frac{\partial L}{\partial\beta} = \sum g

(sums over the batch per feature), which is :math:`a` times the batch-norm training backward plus
:math:`(1 - a)` times the eval backward :math:`\gamma s g`. ``batch_renorm`` is the case
:math:`a = 1` with :math:`c = \mu_B, s = 1/\sqrt{\sigma_B^2 + \epsilon}` (batch norm's gradient
scaled by the detached :math:`r`), or :math:`a = 0` at batch size 1 (the old running moments,
gradient through ``x`` only). The backward is first order: a backward with ``create_graph=True``
through the fused path raises (set the layer's ``fused = False`` for the reference path, which is
differentiable twice).

Used only where it computes the same function as the reference path (:func:`fused_path_applies`):
CPU tensors, float32 or float64 input of the module's own dtype, at least one sample, and a
``moment_reducer`` that is the identity right now
(:func:`~stream_trainer.norms._moments.reducer_is_identity`; an active distributed reducer needs
the raw float64 sums of the reference path); the layers call it in training mode only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from stream_trainer.norms._moments import MomentReducer, reducer_is_identity

__all__ = [
    "NormTape",
    "batch_renorm_forward",
    "ema_batch_norm_forward",
    "fused_norm_train",
    "fused_path_applies",
    "norm_backward",
]

_FLOATS = (torch.float32, torch.float64)
_FIRST_ORDER = (
    "the fused training backward of ema_batch / batch_renorm is first order; set the layer's "
    "`fused = False` to differentiate it twice (create_graph=True)"
)


def fused_path_applies(
    x: Tensor, running_mean: Tensor, weight: Tensor | None, reducer: MomentReducer
) -> bool:
    """Whether the fused path computes exactly what the reference path would (see module doc)."""
    return (
        reducer_is_identity(reducer)
        and x.is_cpu
        and x.dtype in _FLOATS
        and running_mean.dtype == x.dtype
        and (weight is None or weight.dtype == x.dtype)
        and x.numel() > 0
    )


def _col(t: Tensor, x: Tensor) -> Tensor:
    """A per-feature ``(C,)`` tensor shaped to broadcast against ``x`` (``(N, C)``: as is)."""
    return t if x.dim() == 2 else t.view(1, -1, 1)


def _shifted(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_0, x_s, mean(x_s), var(x_s))``: the first row of ``x`` per feature ``(C,)``,
    ``x - x_0``, and the per-feature mean and biased variance of ``x_s`` (two-pass kernel)."""
    first = x[0] if x.dim() == 2 else x[0, :, 0]
    xs = x - _col(first, x)
    mean_s, var_b = torch.batch_norm_update_stats(xs, None, None, 0.0)
    return first, xs, mean_s, var_b


def _update_running_(
    running_mean: Tensor,
    running_var: Tensor,
    first: Tensor,
    mean_s: Tensor,
    var_b: Tensor,
    delta: Tensor,
    a: float,
) -> Tensor:
    r"""The mixture update in place, relative to the shift ``first``: ``mean_s`` is the batch mean
    minus ``first``, ``delta`` the batch mean minus the running mean. Returns the new mean minus
    ``first``.

    Written with the Python float :math:`1 - a` (not ``lerp``, which would round :math:`a` to the
    dtype before taking :math:`1 - a`: all precision lost for :math:`a` within ~1e-7 of 1, the
    weight of a large batch), and exact at :math:`a = 1` (the new moments are the batch's)."""
    center = torch.sub(mean_s, delta, alpha=1.0 - a)  # old_s + a delta
    running_var.addcmul_(delta, delta, value=a).mul_(1.0 - a).add_(var_b, alpha=a)
    torch.add(first, center, out=running_mean)
    return center


def _update_single_(running_mean: Tensor, running_var: Tensor, x0: Tensor, a: float) -> Tensor:
    r"""The mixture update in place for a batch of one sample ``x0`` (:math:`\sigma_B^2 = 0`):
    :math:`\mu' = \hat\mu + a(x_0 - \hat\mu)`, :math:`\sigma'^2 = (1 - a)(\hat\sigma^2 +
    a (x_0 - \hat\mu)^2)`. Returns :math:`x_0 - \hat\mu` (old running mean)."""
    diff = x0 - running_mean
    torch.sub(x0, diff, alpha=1.0 - a, out=running_mean)
    running_var.addcmul_(diff, diff, value=a).mul_(1.0 - a)
    return diff


class NormTape:
    r"""What the backward of a fused training forward needs: :math:`\hat x`, the per-feature
    factor :math:`\gamma r s` (:math:`\partial y / \partial x` at fixed moments), the detached
    :math:`r, d` (``None``: 1 and 0), the batch weight :math:`a` of the gradient and the count
    :math:`n`. :math:`\hat x` is a fresh intermediate nobody else can see (without affine
    parameters the output is a copy of it)."""

    __slots__ = ("a", "d", "factor", "n", "r", "xhat")

    def __init__(
        self,
        xhat: Tensor,
        factor: Tensor,
        r: Tensor | None,
        d: Tensor | None,
        a: float,
        n: int,
    ) -> None:
        self.xhat, self.factor, self.r, self.d, self.a, self.n = xhat, factor, r, d, a, n


def _output(
    xhat: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    invstd: Tensor,
    a: float,
    n: int,
    r: Tensor | None = None,
    d: Tensor | None = None,
) -> tuple[Tensor, NormTape]:
    r""":math:`y = \gamma(r\hat x + d) + \beta` from :math:`\hat x = (x - c)\,s`, and its tape."""
    scale = weight if r is None else (r if weight is None else weight * r)
    offset = bias
    if d is not None:
        shift = d if weight is None else d * weight
        offset = shift if bias is None else bias + shift
    if scale is None:
        y = xhat.clone() if offset is None else xhat + _col(offset, xhat)
    elif offset is None:
        y = xhat * _col(scale, xhat)
    else:
        y = torch.addcmul(_col(offset, xhat), xhat, _col(scale, xhat))
    factor = invstd if scale is None else invstd * scale
    return y, NormTape(xhat, factor, r, d, a, n)


def norm_backward(
    tape: NormTape, dy: Tensor, need_x: bool = True, need_w: bool = True, need_b: bool = True
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dL/dx, dL/dweight, dL/dbias)`` from ``dy = dL/dy`` (module doc); ``None`` where not
    needed. The weight and bias gradients are meaningful only for a layer that has them."""
    xhat, r, d, a = tape.xhat, tape.r, tape.d, tape.a
    batch_terms = need_x and a > 0.0
    dims = (0,) if dy.dim() == 2 else (0, 2)
    dx = gw = gb = sum_g = sum_gx = None
    if batch_terms or need_b or (need_w and d is not None):
        sum_g = dy.sum(dims)
    if batch_terms or need_w:
        two_d = dy.dim() == 2
        sum_gx = torch.linalg.vecdot(dy, xhat, dim=0) if two_d else (dy * xhat).sum(dims)
    if need_w:
        assert sum_gx is not None
        gw = sum_gx if r is None else sum_gx * r
        if d is not None:
            assert sum_g is not None
            gw = torch.addcmul(gw, d, sum_g)
    if need_b:
        gb = sum_g
    if need_x:
        factor = _col(tape.factor, dy)
        if batch_terms:
            assert sum_g is not None and sum_gx is not None
            k = a / tape.n
            dx = torch.addcmul(dy, xhat, _col(sum_gx, dy), value=-k)
            dx.sub_(_col(sum_g, dy), alpha=k).mul_(factor)
        else:
            dx = dy * factor
    return dx, gw, gb


def ema_batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    samples_seen: Tensor,
    a: float,
    eps: float,
) -> tuple[Tensor, NormTape]:
    r"""The fused ``ema_batch`` training forward without autograd (call it where autograd is off):
    updates the running buffers and returns the output and the tape of :func:`norm_backward`."""
    n = x.numel() // x.shape[1]
    if n == 1:  # x - mu' = (1 - a)(x - old mean); no batch statistics to take
        diff = _update_single_(running_mean, running_var, x.reshape(-1), a)
        invstd = torch.add(running_var, eps).rsqrt_()
        xhat = torch.mul(diff, invstd).mul_(1.0 - a).view(x.shape)
    else:
        first, xs, mean_s, var_b = _shifted(x)
        old_s = running_mean - first
        delta = mean_s - old_s
        center = _update_running_(running_mean, running_var, first, mean_s, var_b, delta, a)
        invstd = torch.add(running_var, eps).rsqrt_()
        xhat = (xs - _col(center, xs)).mul_(_col(invstd, xs))
    samples_seen.add_(n)
    return _output(xhat, weight, bias, invstd, a, n)


def batch_renorm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    samples_seen: Tensor,
    a: float,
    eps: float,
    rmax: float,
    dmax: float,
) -> tuple[Tensor, NormTape]:
    r"""The fused ``batch_renorm`` training forward without autograd (as
    :func:`ema_batch_norm_forward`), with the clip limits already scheduled."""
    n = x.numel() // x.shape[1]
    inv_old = torch.add(running_var, eps).rsqrt_()  # the running moments before the update
    r = d = None
    if n == 1:  # the old running moments, gradient through x only
        diff = _update_single_(running_mean, running_var, x.reshape(-1), a)
        xhat = torch.mul(diff, inv_old).view(x.shape)
        invstd, a_grad = inv_old, 0.0
    else:  # batch moments; r and d detached, from the old running moments
        first, xs, mean_s, var_b = _shifted(x)
        old_s = running_mean - first
        delta = mean_s - old_s
        _update_running_(running_mean, running_var, first, mean_s, var_b, delta, a)
        var_eps = var_b + eps
        invstd, a_grad = var_eps.rsqrt(), 1.0
        if rmax != 1.0:
            r = var_eps.sqrt_().mul_(inv_old).clamp_(1.0 / rmax, rmax)
        if dmax != 0.0:
            d = (delta * inv_old).clamp_(-dmax, dmax)
        xhat = (xs - _col(mean_s, xs)).mul_(_col(invstd, xs))
    samples_seen.add_(n)
    return _output(xhat, weight, bias, invstd, a_grad, n, r, d)


class _FusedNormFn(torch.autograd.Function):
    """One autograd node around a ``*_forward`` function above; the tape is kept as a ``ctx``
    attribute rather than through ``save_for_backward``, which spares the per-call cost of
    saved-variable bookkeeping (its tensors are fresh intermediates)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, args: Any
    ) -> Tensor:
        forward_fn, rest = args
        y, ctx.tape = forward_fn(x, weight, bias, *rest)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(_FIRST_ORDER)
        needs = ctx.needs_input_grad
        return (*norm_backward(ctx.tape, dy, needs[0], needs[1], needs[2]), None)


def fused_norm_train(
    forward_fn: Callable[..., tuple[Tensor, NormTape]],
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *rest: Any,
) -> Tensor:
    """``forward_fn(x, weight, bias, *rest)`` (a ``*_forward`` function of this module) as one
    autograd node: differentiable in ``x``, ``weight`` and ``bias`` with :func:`norm_backward`."""
    y: Tensor = _FusedNormFn.apply(x, weight, bias, (forward_fn, rest))
    return y
