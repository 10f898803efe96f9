r"""Numpy kernels of the norm layers, for the small-batch training step of
:mod:`stream_trainer.model.numpy_step`.

At batch size 1 a training step costs the number of array operations, and a numpy operation on 64
values costs a fraction of a PyTorch call (``python bench/bench_step_paths.py``). A kernel works on
``(N, C)`` arrays that *share memory* with its layer's buffers and affine parameters
(``Tensor.numpy()`` views), so the running statistics it updates are the layer's, and checkpoints,
``state_dict`` and the PyTorch forward see them at once.

Each kernel has

* ``serve(z)``: the eval-mode forward (what ``layer.eval()(z)`` computes);
* ``train(z)``: the training-mode forward with the same side effects as ``layer.train()(z)``
  (running statistics, ``samples_seen``), returning the output and a tape;
* ``backward(tape, dy, need_x)``: writes :math:`\partial L/\partial\gamma` and
  :math:`\partial L/\partial\beta` into the gradient arrays the step gave it and returns
  :math:`\partial L/\partial z` (``None`` when ``need_x`` is false).

The formulas are those of the PyTorch paths they stand for and are not repeated here:
``ema_batch`` is :func:`stream_trainer.norms._fused.ema_batch_norm_forward` and
:func:`~stream_trainer.norms._fused.norm_backward` (statistics relative to the first row, the
mixture update, the gradient scaled by the batch weight :math:`a`); ``batch_renorm`` is
:func:`~stream_trainer.norms._fused.batch_renorm_forward` (detached :math:`r, d` from the running
moments before the update, the warm-up of their limits, the running moments at batch size 1) with
the same backward; ``layer`` is
``torch.nn.functional.layer_norm`` with its exact gradient; ``none`` is the identity. They agree
with the PyTorch paths to float rounding (``tests/test_numpy_step.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_trainer.norms._moments import sample_weight_value

__all__ = [
    "BatchRenormKernel",
    "EMABatchKernel",
    "IdentityKernel",
    "LayerKernel",
    "NumpyNormKernel",
    "column_sum",
]

Array = np.ndarray


def column_sum(a: Array, out: Array | None = None) -> Array:
    """``a.sum(axis=0)`` (into ``out`` when given) without numpy's Python-level wrapper, and for
    one row as a copy: at batch size 1 the wrapper costs more than the sum."""
    if a.shape[0] == 1:
        if out is None:
            return a[0].copy()
        out[...] = a[0]
        return out
    return np.add.reduce(a, axis=0, out=out)


def _view(tensor: Any) -> Array | None:
    """A numpy view of a CPU tensor (``None`` stays ``None``)."""
    return None if tensor is None else tensor.detach().numpy()


def _buffer(tensor: Any) -> Array:
    """A numpy view of a buffer the kernel needs."""
    assert tensor is not None
    return tensor.detach().numpy()


class NumpyNormKernel:
    """Base: the identity with no parameters (see the module doc for the three methods)."""

    def serve(self, z: Array) -> Array:
        return z

    def train(self, z: Array) -> tuple[Array, Any]:
        return z, None

    def backward(self, tape: Any, dy: Array, need_x: bool) -> Array | None:
        return dy if need_x else None


class IdentityKernel(NumpyNormKernel):
    """``none``."""


class _Affine(NumpyNormKernel):
    """Holds the affine parameters and the arrays their gradients go to."""

    def __init__(self, layer: Any, grad_weight: Array | None, grad_bias: Array | None) -> None:
        self.weight, self.bias = _view(layer.weight), _view(layer.bias)
        self.grad_weight, self.grad_bias = grad_weight, grad_bias
        self.eps = float(layer.eps)

    def _affine(self, xhat: Array) -> Array:
        r""":math:`\gamma \hat x + \beta`, a new array (``xhat`` stays on the tape)."""
        if self.weight is None:
            return xhat.copy() if self.bias is None else xhat + self.bias
        y = xhat * self.weight
        if self.bias is not None:
            y += self.bias
        return y

    def _parameter_grads(self, dy: Array, xhat: Array) -> tuple[Array, Array]:
        r""":math:`\sum_i g_i \hat x_i` and :math:`\sum_i g_i` per feature, written into the
        gradient arrays where the layer has those parameters."""
        return column_sum(dy * xhat, self.grad_weight), column_sum(dy, self.grad_bias)


class _RunningKernel(_Affine):
    """The running-moment layers: serving with the running moments, the sample-counted mixture
    update (:mod:`stream_trainer.norms._fused`), and the batch-norm style backward."""

    def __init__(self, layer: Any, grad_weight: Array | None, grad_bias: Array | None) -> None:
        super().__init__(layer, grad_weight, grad_bias)
        self.running_mean = _buffer(layer.running_mean)
        self.running_var = _buffer(layer.running_var)
        self.samples_seen = _buffer(layer.samples_seen)
        self.momentum, self.warm_start = float(layer.momentum), bool(layer.warm_start)

    def serve(self, z: Array) -> Array:
        scale = np.add(self.running_var, self.eps)
        np.sqrt(scale, out=scale)
        np.divide(1.0, scale, out=scale)
        if self.weight is not None:
            scale *= self.weight
        y = np.subtract(z, self.running_mean)
        y *= scale
        if self.bias is not None:
            y += self.bias
        return y

    def _batch_weight(self, n: int) -> float:
        t = int(self.samples_seen) if self.warm_start else 0
        return sample_weight_value(n, t, self.momentum, warm_start=self.warm_start)

    def _update_single(self, x0: Array, a: float) -> Array:
        """The mixture update for one sample; returns ``x0`` minus the old running mean."""
        mean, var, keep = self.running_mean, self.running_var, 1.0 - a
        diff = x0 - mean
        np.subtract(x0, keep * diff, out=mean)
        var += a * diff * diff
        var *= keep
        return diff

    def _update_batch(self, z: Array, a: float) -> tuple[Array, Array, Array, Array, Array]:
        """The mixture update for ``n >= 2`` rows, with the moments taken relative to the first
        row; returns ``(x_s, mean_s, var_b, delta, center)``: the shifted rows, their mean, the
        biased batch variance, the batch mean minus the old running mean, and the new running
        mean minus the first row."""
        mean, var, keep = self.running_mean, self.running_var, 1.0 - a
        first = z[0]
        xs = z - first
        mean_s = np.add.reduce(xs, axis=0) / float(z.shape[0])
        dev = xs - mean_s
        var_b = np.add.reduce(dev * dev, axis=0) / float(z.shape[0])
        delta = mean_s - (mean - first)
        center = mean_s - keep * delta
        var += a * delta * delta
        var *= keep
        var += a * var_b
        np.add(first, center, out=mean)
        return xs, mean_s, var_b, delta, center

    def _output(
        self, xhat: Array, invstd: Array, a: float, n: int, r: Array | None, d: Array | None
    ) -> tuple[Array, Any]:
        r""":math:`y = \gamma(r\hat x + d) + \beta` and the tape of :meth:`backward`."""
        self.samples_seen += n
        w = self.weight
        scale = w if r is None else (r if w is None else w * r)
        offset = self.bias
        if d is not None:
            shift = d if w is None else d * w
            offset = shift if offset is None else offset + shift
        if scale is None:  # xhat stays on the tape: never changed in place
            y = xhat.copy() if offset is None else xhat + offset
        else:
            y = xhat * scale
            if offset is not None:
                y += offset
        factor = invstd if scale is None else invstd * scale
        return y, (xhat, factor, r, d, a, n)

    def backward(self, tape: Any, dy: Array, need_x: bool) -> Array | None:
        xhat, factor, r, d, a, n = tape
        sum_gx, sum_g = column_sum(dy * xhat), column_sum(dy)
        if self.grad_weight is not None:
            gw = sum_gx if r is None else sum_gx * r
            if d is not None:
                gw = gw + d * sum_g
            self.grad_weight[...] = gw
        if self.grad_bias is not None:
            self.grad_bias[...] = sum_g
        if not need_x:
            return None
        if a == 0.0:
            return dy * factor
        k = a / n
        dx = xhat * (-k * sum_gx)
        dx += dy
        dx -= k * sum_g
        dx *= factor
        return dx


class EMABatchKernel(_RunningKernel):
    """``ema_batch`` (:class:`~stream_trainer.norms.batch.EMABatchNorm`), single process:
    :func:`~stream_trainer.norms._fused.ema_batch_norm_forward`."""

    def train(self, z: Array) -> tuple[Array, Any]:
        n = z.shape[0]
        a = self._batch_weight(n)
        if n == 1:  # x - mu' = (1 - a)(x - old mean)
            diff = self._update_single(z[0], a)
            invstd = 1.0 / np.sqrt(self.running_var + self.eps)
            xhat = (diff * invstd * (1.0 - a))[None, :]
        else:
            xs, _, _, _, center = self._update_batch(z, a)
            invstd = 1.0 / np.sqrt(self.running_var + self.eps)
            xs -= center
            xs *= invstd
            xhat = xs
        return self._output(xhat, invstd, a, n, None, None)


class BatchRenormKernel(_RunningKernel):
    """``batch_renorm`` (:class:`~stream_trainer.norms.batch.BatchRenorm`), single process:
    :func:`~stream_trainer.norms._fused.batch_renorm_forward`, with the layer's warm-up of the
    clip limits."""

    def __init__(self, layer: Any, grad_weight: Array | None, grad_bias: Array | None) -> None:
        super().__init__(layer, grad_weight, grad_bias)
        self.clip_limits = layer._clip_limit_values

    def train(self, z: Array) -> tuple[Array, Any]:
        n = z.shape[0]
        t = int(self.samples_seen)
        a = sample_weight_value(n, t, self.momentum, warm_start=self.warm_start)
        inv_old = 1.0 / np.sqrt(self.running_var + self.eps)  # before the update
        if n == 1:  # the old running moments, gradient through x only
            diff = self._update_single(z[0], a)
            return self._output((diff * inv_old)[None, :], inv_old, 0.0, n, None, None)
        rmax, dmax = self.clip_limits(t)
        xs, mean_s, var_b, delta, _ = self._update_batch(z, a)
        var_eps = var_b + self.eps
        invstd = 1.0 / np.sqrt(var_eps)
        r = d = None
        if rmax != 1.0:
            r = np.clip(np.sqrt(var_eps) * inv_old, 1.0 / rmax, rmax)
        if dmax != 0.0:
            d = np.clip(delta * inv_old, -dmax, dmax)
        xs -= mean_s
        xs *= invstd
        return self._output(xs, invstd, 1.0, n, r, d)


class LayerKernel(_Affine):
    """``layer`` (:class:`~stream_trainer.norms.per_sample.LayerNorm`) on ``(N, C)``."""

    def _normalize(self, z: Array) -> tuple[Array, Array]:
        mean = z.mean(axis=1, keepdims=True)
        xc = z - mean
        var = np.mean(xc * xc, axis=1, keepdims=True)
        invstd = 1.0 / np.sqrt(var + self.eps)
        xc *= invstd
        return xc, invstd

    def serve(self, z: Array) -> Array:
        return self._affine(self._normalize(z)[0])

    def train(self, z: Array) -> tuple[Array, Any]:
        xhat, invstd = self._normalize(z)
        return self._affine(xhat), (xhat, invstd)

    def backward(self, tape: Any, dy: Array, need_x: bool) -> Array | None:
        r""":math:`\partial L/\partial x = \frac{s}{C}\big(C g' - \sum_c g' - \hat x \sum_c g'
        \hat x\big)` per row, :math:`g' = \gamma g`, :math:`s = 1/\sqrt{\sigma^2+\epsilon}`."""
        xhat, invstd = tape
        self._parameter_grads(dy, xhat)
        if not need_x:
            return None
        g = dy if self.weight is None else dy * self.weight
        width = g.shape[1]
        dx = xhat * -np.sum(g * xhat, axis=1, keepdims=True)
        dx -= np.sum(g, axis=1, keepdims=True)
        dx += width * g
        dx *= invstd / width
        return dx
