r"""The compiled kernels of the step engine: serving forward and a whole training step (forward,
loss, backward, clipping, Adam or AdamW, norm statistics) of ``K`` stacked MLP members in one call.

**Why compiled.** At batch size 1 a step is a few thousand multiply-adds spread over a few hundred
array operations; interpreted, each operation costs more than its arithmetic. Compiled as one
function, the step costs about its arithmetic. Numba compiles on first use and keeps the machine
code in its on-disk cache (``cache=True``), so a second process does not compile again.

**Layout.** Member ``k``'s parameters are row ``k`` of ``params`` ``(K, P)``, in the order of
``model.parameters()``; ``grads``, ``exp_avg`` and ``exp_avg_sq`` have the same layout, ``steps``
``(K, n_tensors)`` is Adam's step count per tensor. ``ints (L + 1, 8)`` describes the ``L``
hidden layers and the head (row ``L``): input width, output width, offsets of the weight
(row-major ``(out, in)``), the bias, the norm's scale and shift (``-1``: absent), the norm's
running moments in ``run_mean``/``run_var`` ``(K, S)``, and the norm's kind (0 none, 1
``ema_batch``, 2 ``batch_renorm``, 3 ``layer``); ``floats (L, 6)`` each norm's ``eps``,
``warm_start`` (0/1) and ``batch_renorm``'s ``rmax, dmax`` and warm-up start and end. A norm's
sample count is ``seen[k, layer]``; the skip weight ``(out, in)`` is at ``skip_off`` (``-1``:
none); ``act``: 0 relu, 1 gelu (exact), 2 tanh, 3 silu.

**Math.** Linear layers :math:`z = hW^\top + b`; the norms as their PyTorch layers
(:mod:`stream_trainer.norms`): ``ema_batch`` normalizes with the running moments *after* mixing
in the batch's, :math:`\mu' = (1-a)\mu + a\mu_B`, :math:`\sigma'^2 = (1-a)\sigma^2 + a\sigma_B^2 +
a(1-a)(\mu_B - \mu)^2` with batch moments taken relative to the first row, so the gradient reaches
:math:`\mu_B, \sigma_B^2` with weight :math:`a`; ``batch_renorm`` normalizes with the batch moments
times the detached :math:`r = \sigma_B/\sigma`, plus :math:`d = (\mu_B - \mu)/\sigma`, clipped to
limits warmed up over the samples seen (at one row it normalizes with the old running moments);
``layer`` per row. :math:`a = 1-(1-m)^n` for ``n`` rows at momentum ``m`` (with ``warm_start``,
at least :math:`n/(t+n)`, and :math:`1/2` for a lone first row). Losses: batch-mean
cross-entropy on the logits, or the mean squared error over all outputs. Clipping multiplies a
member's gradient by :math:`\min(1, c/(\lVert g\rVert_2 + 10^{-6}))`; Adam is PyTorch's update,
:math:`m \leftarrow m + (1-\beta_1)(g - m)`, :math:`v \leftarrow \beta_2 v + (1-\beta_2)g^2`,
:math:`\theta \leftarrow \theta - \frac{\eta_k}{1-\beta_1^t}\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t}
+ \epsilon}` (Adam adds :math:`\lambda\theta` to :math:`g` first, AdamW scales :math:`\theta` by
:math:`1 - \eta_k\lambda`). Members differ only in their parameters, statistics, learning rate
:math:`\eta_k` and norm momenta.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
from numba import njit

__all__ = [
    "adagrad_rows",
    "argmax_errors",
    "learn_step",
    "sample_weight",
    "serve_step",
    "softmax_mix",
    "standardize_rows",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def _compiled(fn: _F) -> _F:
    """Compile ``fn`` with the engine's options; ``error_model="numpy"``: a division by zero
    gives inf/nan instead of raising, which lets the loops vectorize (the inputs are screened and
    the denominators positive)."""
    options = {"contract", "reassoc", "nsz", "arcp"}
    return cast(_F, njit(cache=True, fastmath=options, error_model="numpy", nogil=True)(fn))


def _compiled_exact(fn: _F) -> _F:
    """Compile ``fn`` without reassociation: the same operations in the same order as the numpy
    code it stands for, hence the same bits."""
    return cast(_F, njit(cache=True, error_model="numpy", nogil=True)(fn))


_SQRT1_2 = math.sqrt(0.5)
_PDF_SCALE = 1.0 / math.sqrt(2.0 * math.pi)
_LN2 = math.log(2.0)
_INV_LN2 = 1.0 / _LN2
_EXP_FLOOR = -700.0  # exp of it is far below float32's smallest number, and 2**k stays normal


@_compiled
def _linear(h, p, w_off, b_off, n_in, n_out, out, accumulate):
    """``out (N, n_out) = h @ W.T + b`` (``b_off < 0``: no bias; ``accumulate``: add to out).
    The products go to BLAS, whose call costs less than a loop even at one row."""
    weight = p[w_off : w_off + n_in * n_out].reshape(n_out, n_in)
    if accumulate:
        out += np.dot(h, weight.T)
    else:
        np.dot(h, weight.T, out)
    if b_off >= 0:
        for r in range(out.shape[0]):
            for o in range(n_out):
                out[r, o] += p[b_off + o]


@_compiled
def _linear_backward(dz, h, p, g, w_off, b_off, n_in, n_out, dh):
    """Gradients of ``z = h @ W.T + b``: ``W`` and ``b`` into ``g``; ``dh = dz @ W`` when ``dh``
    has rows (an empty one: not needed)."""
    grad = g[w_off : w_off + n_in * n_out].reshape(n_out, n_in)
    np.dot(dz.T, h, grad)
    if b_off >= 0:
        for o in range(n_out):
            g[b_off + o] = 0.0
        for r in range(dz.shape[0]):
            for o in range(n_out):
                g[b_off + o] += dz[r, o]
    if dh.shape[0] > 0:
        np.dot(dz, p[w_off : w_off + n_in * n_out].reshape(n_out, n_in), dh)


@_compiled
def _erf32(x):
    """erf to float32 rounding, as a rational polynomial on ``[-4, 4]`` (the form Eigen and
    XLA use for float32): unlike ``math.erf`` it vectorizes."""
    x = min(max(x, -4.0), 4.0)
    x2 = x * x
    p = x2 * -2.72614225801306e-10 + 2.77068142495902e-08
    p = x2 * p - 2.10102402082508e-06
    p = x2 * p - 5.69250639462346e-05
    p = x2 * p - 7.34990630326855e-04
    p = x2 * p - 2.95459980854025e-03
    p = x2 * p - 1.60960333262415e-02
    q = x2 * -1.45660718464996e-05 - 2.13374055278905e-04
    q = x2 * q - 1.68282697438203e-03
    q = x2 * q - 7.37332916720468e-03
    q = x2 * q - 1.42647390514189e-02
    return x * p / q


@_compiled
def _exp_parts(t):
    r"""``(m, k)`` with :math:`e^t = m \cdot 2^k` for ``t`` in ``[_EXP_FLOOR, 0]``: ``k`` the
    nearest integer to :math:`t / \ln 2`, ``m`` the degree-8 Taylor polynomial of :math:`e^f`
    at :math:`f = t - k \ln 2 \in [-\ln 2 / 2, \ln 2 / 2]`, relative error under
    :math:`10^{-9}`, far below float32 rounding. In float64, without a library call, so that the
    loop around it vectorizes (``math.exp`` does not)."""
    k = np.floor(t * _INV_LN2 + 0.5)  # a float: math.floor's int does not vectorize
    f = t - k * _LN2
    m = 1.0 / 40320.0 + f * (1.0 / 362880.0)
    m = 1.0 / 5040.0 + f * m
    m = 1.0 / 720.0 + f * m
    m = 1.0 / 120.0 + f * m
    m = 1.0 / 24.0 + f * m
    m = 1.0 / 6.0 + f * m
    m = 0.5 + f * m
    m = 1.0 + f * m
    m = 1.0 + f * m
    return m, k


@_compiled
def _cdf(v, fast):
    r""":math:`\Phi(v) = \tfrac12(1 + \operatorname{erf}(v/\sqrt2))` (``fast``: float32 data)."""
    e = _erf32(v * _SQRT1_2) if fast else math.erf(v * _SQRT1_2)
    return 0.5 * (1.0 + e)


@_compiled
def _activate(act, z, out):
    """``out = act(z)``; one loop per activation, so that each vectorizes."""
    rows, cols = z.shape
    fast = z.itemsize == 4
    if act == 0:
        for r in range(rows):
            for c in range(cols):
                out[r, c] = max(z[r, c], 0.0)
    elif act == 1:
        for r in range(rows):
            for c in range(cols):
                out[r, c] = z[r, c] * _cdf(z[r, c], fast)
    elif act == 2:
        for r in range(rows):
            for c in range(cols):
                out[r, c] = math.tanh(z[r, c])
    else:
        for r in range(rows):
            for c in range(cols):
                out[r, c] = z[r, c] / (1.0 + math.exp(-z[r, c]))


@_compiled
def _activate_backward(act, dy, z, a, out):
    """``out = dy * act'(z)`` (``a``: the activation's output)."""
    rows, cols = z.shape
    fast = z.itemsize == 4
    if act == 0:
        for r in range(rows):
            for c in range(cols):
                out[r, c] = dy[r, c] if a[r, c] > 0.0 else 0.0
    elif act == 1 and fast:  # float32 data: exp as m * 2**k (_exp_parts), 2**k from its bits
        mantissa = np.empty(rows * cols, np.float64)
        bits = np.empty(rows * cols, np.int64)
        for r in range(rows):
            for c in range(cols):
                v = z[r, c]
                m, k = _exp_parts(max(-0.5 * v * v, _EXP_FLOOR))
                mantissa[r * cols + c] = m
                # through int32: a double -> int64 conversion does not vectorize without AVX-512
                bits[r * cols + c] = np.int64(np.int32(k) + np.int32(1023)) << 52
        power = bits.view(np.float64)
        for r in range(rows):
            for c in range(cols):
                v = z[r, c]
                pdf = mantissa[r * cols + c] * power[r * cols + c] * _PDF_SCALE
                out[r, c] = dy[r, c] * (_cdf(v, True) + v * pdf)
    elif act == 1:
        for r in range(rows):
            for c in range(cols):
                v = z[r, c]
                pdf = math.exp(-0.5 * v * v) * _PDF_SCALE
                out[r, c] = dy[r, c] * (_cdf(v, fast) + v * pdf)
    elif act == 2:
        for r in range(rows):
            for c in range(cols):
                out[r, c] = dy[r, c] * (1.0 - a[r, c] * a[r, c])
    else:
        for r in range(rows):
            for c in range(cols):
                s = 1.0 / (1.0 + math.exp(-z[r, c]))
                out[r, c] = dy[r, c] * s * (1.0 + z[r, c] * (1.0 - s))


@_compiled
def sample_weight(n, t, momentum, warm_start):
    """:math:`a` for ``n`` rows after ``t`` samples (module doc)."""
    a = 1.0 if momentum >= 1.0 else -math.expm1(n * math.log1p(-momentum))
    if warm_start:
        lone_first = 1.0 if (t == 0 and n == 1) else 0.0
        a = max(a, n / (float(t) + n + lone_first))
    return a


@_compiled
def _per_row_norm(kind, z, p, g_off, be_off, eps, xhat, row_inv, out):
    """``none`` (a copy) or ``layer`` (per row, the same in training and serving) of ``z`` into
    ``out``, with ``xhat`` and the per-row ``row_inv`` kept for the backward."""
    rows, cols = z.shape
    if kind == 0:
        for r in range(rows):
            for c in range(cols):
                out[r, c] = z[r, c]
        return
    for r in range(rows):
        mu = 0.0
        for c in range(cols):
            mu += z[r, c]
        mu /= cols
        sq = 0.0
        for c in range(cols):
            sq += (z[r, c] - mu) * (z[r, c] - mu)
        inv = 1.0 / math.sqrt(sq / cols + eps)
        row_inv[r] = inv
        for c in range(cols):
            v = (z[r, c] - mu) * inv
            xhat[r, c] = v
            if g_off >= 0:
                v *= p[g_off + c]
            if be_off >= 0:
                v += p[be_off + c]
            out[r, c] = v


@_compiled
def _serve_norm(kind, z, p, g_off, be_off, mean, var, s_off, eps, out):
    """Eval-mode norm of ``z`` into ``out`` (running moments, or per row for ``layer``)."""
    rows, cols = z.shape
    if kind == 0 or kind == 3:
        xhat = np.empty_like(z)
        _per_row_norm(kind, z, p, g_off, be_off, eps, xhat, np.empty(rows, z.dtype), out)
        return
    scale = np.empty(cols)
    shift = np.empty(cols)
    m = np.empty(cols, mean.dtype)
    for c in range(cols):
        scale[c] = 1.0 / math.sqrt(var[s_off + c] + eps)
        if g_off >= 0:
            scale[c] *= p[g_off + c]
        shift[c] = p[be_off + c] if be_off >= 0 else 0.0
        m[c] = mean[s_off + c]
    for r in range(rows):  # rows outside, columns inside: along memory
        for c in range(cols):
            out[r, c] = (z[r, c] - m[c]) * scale[c] + shift[c]


@_compiled
def _train_norm(
    kind,
    z,
    p,
    g_off,
    be_off,
    mean,
    var,
    s_off,
    eps,
    a,
    rmax,
    dmax,
    xhat,
    factor,
    rr,
    dd,
    row_inv,
    out,
):
    """Training-mode norm of ``z`` into ``out``, updating the running moments; fills the tape
    (``xhat``; per feature ``factor`` = d out/d xhat-path scale, ``rr``, ``dd``; per row
    ``row_inv`` for ``layer``). Returns the weight with which the gradient reaches the batch
    moments (0: the output depends on each row alone)."""
    rows, cols = z.shape
    if kind == 0 or kind == 3:
        _per_row_norm(kind, z, p, g_off, be_off, eps, xhat, row_inv, out)
        return 0.0
    if rows > 1:
        return _train_moments(
            kind, z, p, g_off, be_off, mean, var, s_off, eps, a, rmax, dmax, xhat, factor, rr, dd,
            out,
        )  # fmt: skip
    keep = 1.0 - a
    weight_out = a
    for c in range(cols):
        m = mean[s_off + c]
        v = var[s_off + c]
        r_c = 1.0
        d_c = 0.0
        diff = z[0, c] - m
        mean[s_off + c] = z[0, c] - keep * diff
        if kind == 1:
            v = (v + a * diff * diff) * keep
            var[s_off + c] = v
            inv = 1.0 / math.sqrt(v + eps)
            xhat[0, c] = diff * inv * keep
        else:  # batch_renorm at one row: the old running moments, gradient through x only
            inv = 1.0 / math.sqrt(v + eps)
            var[s_off + c] = (v + a * diff * diff) * keep
            xhat[0, c] = diff * inv
            weight_out = 0.0
        gamma = p[g_off + c] if g_off >= 0 else 1.0
        beta = p[be_off + c] if be_off >= 0 else 0.0
        scale = gamma * r_c
        shift = beta + d_c * gamma
        factor[c] = inv * scale
        rr[c] = r_c
        dd[c] = d_c
        for r in range(rows):
            out[r, c] = xhat[r, c] * scale + shift
    return weight_out


@_compiled
def _train_moments(
    kind, z, p, g_off, be_off, mean, var, s_off, eps, a, rmax, dmax, xhat, factor, rr, dd, out
):
    """:func:`_train_norm` of the running-moment norms on two rows or more: per column, the
    batch mean and variance about the first row (sums over the rows in order), the running
    moments' update, then ``xhat`` and ``out``. The loops run over rows outside and columns
    inside, along memory, so that they vectorize."""
    rows, cols = z.shape
    keep = 1.0 - a
    first = z[0].copy()
    ms = np.zeros(cols)
    for r in range(rows):
        for c in range(cols):
            ms[c] += z[r, c] - first[c]
    for c in range(cols):
        ms[c] /= rows
    vb = np.zeros(cols)
    for r in range(rows):
        for c in range(cols):
            dev = z[r, c] - first[c] - ms[c]
            vb[c] += dev * dev
    center = np.empty(cols)
    inv = np.empty(cols)
    scale = np.empty(cols)
    shift = np.empty(cols)
    for c in range(cols):
        vb_c = vb[c] / rows
        m = mean[s_off + c]
        v = var[s_off + c]
        inv_old = 1.0 / math.sqrt(v + eps)
        delta = ms[c] - (m - first[c])
        center_c = ms[c] - keep * delta
        v = (v + a * delta * delta) * keep + a * vb_c
        var[s_off + c] = v
        mean[s_off + c] = first[c] + center_c
        r_c = 1.0
        d_c = 0.0
        if kind == 1:
            inv[c] = 1.0 / math.sqrt(v + eps)
            center[c] = center_c
        else:
            var_eps = vb_c + eps
            inv[c] = 1.0 / math.sqrt(var_eps)
            center[c] = ms[c]
            if rmax != 1.0:
                r_c = min(max(math.sqrt(var_eps) * inv_old, 1.0 / rmax), rmax)
            if dmax != 0.0:
                d_c = min(max(delta * inv_old, -dmax), dmax)
        gamma = p[g_off + c] if g_off >= 0 else 1.0
        beta = p[be_off + c] if be_off >= 0 else 0.0
        scale[c] = gamma * r_c
        shift[c] = beta + d_c * gamma
        factor[c] = inv[c] * scale[c]
        rr[c] = r_c
        dd[c] = d_c
    for r in range(rows):
        for c in range(cols):
            xhat[r, c] = (z[r, c] - first[c] - center[c]) * inv[c]
            out[r, c] = xhat[r, c] * scale[c] + shift[c]
    return a if kind == 1 else 1.0


@_compiled
def _norm_backward(kind, dy, xhat, factor, rr, dd, row_inv, a_w, p, g, g_off, be_off, dz):
    """Gradients of the norm: scale and shift into ``g``, ``dz`` from ``dy``."""
    rows, cols = dy.shape
    if kind == 0:
        for r in range(rows):
            for c in range(cols):
                dz[r, c] = dy[r, c]
        return
    k = a_w / rows
    # per column sums over the rows in order; rows outside, columns inside: along memory
    sgx = np.zeros(cols)
    sg = np.zeros(cols)
    for r in range(rows):
        for c in range(cols):
            sgx[c] += dy[r, c] * xhat[r, c]
            sg[c] += dy[r, c]
    for c in range(cols):
        if kind == 3:  # layer: y = gamma xhat + beta
            if g_off >= 0:
                g[g_off + c] = sgx[c]
        elif g_off >= 0:  # the running-moment norms: y = gamma (r xhat + d) + beta
            g[g_off + c] = sgx[c] * rr[c] + dd[c] * sg[c]
        if be_off >= 0:
            g[be_off + c] = sg[c]
    if kind != 3:
        for r in range(rows):
            for c in range(cols):
                dz[r, c] = (dy[r, c] - k * xhat[r, c] * sgx[c] - k * sg[c]) * factor[c]
    if kind == 3:
        for r in range(rows):
            s1 = 0.0
            s2 = 0.0
            for c in range(cols):
                gc = dy[r, c] * (p[g_off + c] if g_off >= 0 else 1.0)
                s1 += gc
                s2 += gc * xhat[r, c]
            scale = row_inv[r] / cols
            for c in range(cols):
                gc = dy[r, c] * (p[g_off + c] if g_off >= 0 else 1.0)
                dz[r, c] = scale * (cols * gc - s1 - xhat[r, c] * s2)


@_compiled
def _forward_member(x, p, ints, floats, act, skip_off, mean, var, out):
    """Eval-mode logits of one member into ``out (N, C)``."""
    rows = x.shape[0]
    layers = ints.shape[0] - 1
    h = x
    for li in range(layers):
        z = np.empty((rows, ints[li, 1]), dtype=x.dtype)
        _linear(h, p, ints[li, 2], ints[li, 3], ints[li, 0], ints[li, 1], z, False)
        nz = np.empty_like(z)
        _serve_norm(
            ints[li, 7],
            z,
            p,
            ints[li, 4],
            ints[li, 5],
            mean,
            var,
            ints[li, 6],
            floats[li, 0],
            nz,
        )
        _activate(act, nz, z)
        h = z
    _linear(h, p, ints[layers, 2], ints[layers, 3], ints[layers, 0], ints[layers, 1], out, False)
    if skip_off >= 0:
        _linear(x, p, skip_off, -1, ints[0, 0], ints[layers, 1], out, True)


@_compiled
def serve_step(x, params, run_mean, run_var, ints, floats, act, skip_off, out):
    """Eval-mode outputs of every member: ``out (K, N, C)``; updates nothing."""
    for k in range(params.shape[0]):
        _forward_member(x, params[k], ints, floats, act, skip_off, run_mean[k], run_var[k], out[k])


@_compiled
def learn_step(
    x,
    labels,
    targets,
    regression,
    params,
    grads,
    exp_avg,
    exp_avg_sq,
    steps,
    run_mean,
    run_var,
    seen,
    ints,
    floats,
    act,
    skip_off,
    momentum,
    lr,
    hyper,
    losses,
):
    """One training step of every member on the same rows (module doc). ``labels`` (N,) class
    indices for cross-entropy, or ``targets`` (N, 1) standardized targets when ``regression``;
    ``momentum (K, L)`` per member and layer; ``lr (K,)``; ``hyper`` = Adam's ``beta1, beta2,
    eps, weight decay, decoupled (0/1)`` and the clipping norm (``<= 0``: none); ``ints`` and
    ``floats``: the layout (module doc). Writes each member's loss into ``losses (K,)``."""
    rows = x.shape[0]
    layers = ints.shape[0] - 1
    outs = ints[layers, 1]
    dtype = x.dtype
    width = 0
    for li in range(layers):
        width += ints[li, 1]
    # the tape: per layer the pre-norm input, xhat, post-norm and activation, (N, width) each
    z_all = np.empty(rows * width, dtype=dtype)
    xh_all = np.empty(rows * width, dtype=dtype)
    n_all = np.empty(rows * width, dtype=dtype)
    a_all = np.empty(rows * width, dtype=dtype)
    factor = np.empty(width, dtype=dtype)
    rr = np.empty(width, dtype=dtype)
    dd = np.empty(width, dtype=dtype)
    row_inv = np.empty(rows * layers, dtype=dtype)
    a_w = np.empty(layers)
    out = np.empty((rows, outs), dtype=dtype)
    for k in range(params.shape[0]):
        p = params[k]
        g = grads[k]
        # ---- forward, updating the running moments
        h = x
        col = 0
        for li in range(layers):
            w = ints[li, 1]
            z = z_all[col * rows : (col + w) * rows].reshape(rows, w)
            xh = xh_all[col * rows : (col + w) * rows].reshape(rows, w)
            nz = n_all[col * rows : (col + w) * rows].reshape(rows, w)
            az = a_all[col * rows : (col + w) * rows].reshape(rows, w)
            _linear(h, p, ints[li, 2], ints[li, 3], ints[li, 0], w, z, False)
            kind = ints[li, 7]
            a = 0.0
            rmax = 1.0
            dmax = 0.0
            if kind == 1 or kind == 2:
                t = seen[k, li]
                a = sample_weight(rows, t, momentum[k, li], floats[li, 1] != 0.0)
                if kind == 2:
                    start = floats[li, 4]
                    end = floats[li, 5]
                    if end > start:
                        prog = min(max((t - start) / (end - start), 0.0), 1.0)
                    else:
                        prog = 1.0 if t >= start else 0.0
                    rmax = 1.0 + (floats[li, 2] - 1.0) * prog
                    dmax = floats[li, 3] * prog
                seen[k, li] += rows
            a_w[li] = _train_norm(
                kind,
                z,
                p,
                ints[li, 4],
                ints[li, 5],
                run_mean[k],
                run_var[k],
                ints[li, 6],
                floats[li, 0],
                a,
                rmax,
                dmax,
                xh,
                factor[col : col + w],
                rr[col : col + w],
                dd[col : col + w],
                row_inv[li * rows : (li + 1) * rows],
                nz,
            )
            _activate(act, nz, az)
            h = az
            col += w
        _linear(h, p, ints[layers, 2], ints[layers, 3], ints[layers, 0], outs, out, False)
        if skip_off >= 0:
            _linear(x, p, skip_off, -1, ints[0, 0], outs, out, True)
        # ---- loss and its gradient (into out)
        loss = 0.0
        if regression:
            scale = 2.0 / (rows * outs)
            for r in range(rows):
                for o in range(outs):
                    diff = out[r, o] - targets[r, o]
                    loss += diff * diff
                    out[r, o] = diff * scale
            loss /= rows * outs
        else:
            for r in range(rows):
                top = out[r, 0]
                for o in range(1, outs):
                    top = max(top, out[r, o])
                total = 0.0
                for o in range(outs):
                    total += math.exp(out[r, o] - top)
                loss += math.log(total) - (out[r, labels[r]] - top)
                for o in range(outs):
                    out[r, o] = math.exp(out[r, o] - top) / total / rows
                out[r, labels[r]] -= 1.0 / rows
            loss /= rows
        losses[k] = loss
        # ---- backward
        if skip_off >= 0:
            _linear_backward(out, x, p, g, skip_off, -1, ints[0, 0], outs, out[:0])
        col = width
        dh = np.empty((rows, ints[layers, 0]), dtype=dtype)
        h_last = a_all[(col - ints[layers, 0]) * rows : col * rows].reshape(rows, ints[layers, 0])
        if layers == 0:
            h_last = x
        _linear_backward(
            out,
            h_last,
            p,
            g,
            ints[layers, 2],
            ints[layers, 3],
            ints[layers, 0],
            outs,
            dh if layers > 0 else dh[:0],
        )
        for li in range(layers - 1, -1, -1):
            w = ints[li, 1]
            col -= w
            z = z_all[col * rows : (col + w) * rows].reshape(rows, w)
            xh = xh_all[col * rows : (col + w) * rows].reshape(rows, w)
            nz = n_all[col * rows : (col + w) * rows].reshape(rows, w)
            az = a_all[col * rows : (col + w) * rows].reshape(rows, w)
            dn = np.empty((rows, w), dtype=dtype)
            _activate_backward(act, dh, nz, az, dn)
            _norm_backward(
                ints[li, 7],
                dn,
                xh,
                factor[col : col + w],
                rr[col : col + w],
                dd[col : col + w],
                row_inv[li * rows : (li + 1) * rows],
                a_w[li],
                p,
                g,
                ints[li, 4],
                ints[li, 5],
                z,
            )
            if li > 0:
                prev = ints[li, 0]
                h_in = a_all[(col - prev) * rows : col * rows].reshape(rows, prev)
                dh = np.empty((rows, prev), dtype=dtype)
                _linear_backward(z, h_in, p, g, ints[li, 2], ints[li, 3], prev, w, dh)
            else:
                _linear_backward(z, x, p, g, ints[li, 2], ints[li, 3], ints[0, 0], w, z[:0])
        # ---- clipping and the optimizer
        if hyper[5] > 0.0:
            total = 0.0
            for i in range(g.shape[0]):
                total += g[i] * g[i]
            coef = hyper[5] / (math.sqrt(total) + 1e-6)
            if coef < 1.0:
                for i in range(g.shape[0]):
                    g[i] *= coef
        for i in range(steps.shape[1]):
            steps[k, i] += 1.0
        step = float(steps[k, 0])
        _adam(
            p,
            g,
            exp_avg[k],
            exp_avg_sq[k],
            lr[k],
            hyper[0],
            hyper[1],
            hyper[2],
            step,
            hyper[3],
            hyper[4] != 0.0,
        )


@_compiled
def _adam(p, g, m, v, lr, beta1, beta2, eps, step, weight_decay, decoupled):
    """Adam (or AdamW with ``decoupled``) on one member's flat buffers, constants in the
    buffers' dtype so the loop vectorizes."""
    dt = p.dtype.type
    coupled = dt(0.0)
    if weight_decay != 0.0:
        if decoupled:
            shrink = dt(1.0 - lr * weight_decay)
            for i in range(p.shape[0]):
                p[i] *= shrink
        else:
            coupled = dt(weight_decay)
    step_size = dt(lr / (1.0 - beta1**step))
    root = dt(1.0 / math.sqrt(1.0 - beta2**step))
    c1, c2, b2, e = dt(1.0 - beta1), dt(1.0 - beta2), dt(beta2), dt(eps)
    for i in range(p.shape[0]):
        gi = g[i] + coupled * p[i]
        mi = m[i] + c1 * (gi - m[i])
        m[i] = mi
        vi = b2 * v[i] + c2 * gi * gi
        v[i] = vi
        p[i] -= step_size * mi / (math.sqrt(vi) * root + e)


@_compiled
def adagrad_rows(theta, sum_sq, x, labels, targets, regression, lr, eps):
    r"""Per-row Adagrad steps of the linear expert (:mod:`stream_trainer.model.linear_expert`)
    on ``theta = [W | b]`` ``(K, D + 1)`` float64, rows of ``x`` in order: logits :math:`z = Wx +
    b`, :math:`dz` = softmax minus one-hot (``labels``), or :math:`z - y` (``targets``) when
    ``regression``; :math:`g = dz\,[x, 1]^\top`, :math:`G \leftarrow G + g^2`, :math:`\theta
    \leftarrow \theta - \eta g / (\sqrt G + \epsilon)`."""
    k_out, width = theta.shape
    d = width - 1
    dz = np.empty(k_out)
    for r in range(x.shape[0]):
        for o in range(k_out):
            acc = theta[o, d]
            for i in range(d):
                acc += theta[o, i] * x[r, i]
            dz[o] = acc
        if regression:
            dz[0] -= targets[r]
        else:
            top = dz[0]
            for o in range(1, k_out):
                top = max(top, dz[o])
            total = 0.0
            for o in range(k_out):
                dz[o] = math.exp(dz[o] - top)
                total += dz[o]
            for o in range(k_out):
                dz[o] /= total
            dz[labels[r]] -= 1.0
        for o in range(k_out):
            grad_o = dz[o]
            for i in range(width):
                gi = grad_o * (x[r, i] if i < d else 1.0)
                s = sum_sq[o, i] + gi * gi
                sum_sq[o, i] = s
                theta[o, i] -= lr * gi / (math.sqrt(s) + eps)


@_compiled
def softmax_mix(outputs, weights, probs, mixed):
    r"""Per expert the row-wise softmax of its logits ``outputs (M, N, C)`` into ``probs``
    (float64), and their mixture :math:`\sum_m w_m p_m` into ``mixed (N, C)``."""
    experts, rows, cols = outputs.shape
    for r in range(rows):
        for c in range(cols):
            mixed[r, c] = 0.0
        for m in range(experts):
            top = -np.inf
            for c in range(cols):
                top = max(top, float(outputs[m, r, c]))
            total = 0.0
            for c in range(cols):
                e = math.exp(float(outputs[m, r, c]) - top)
                probs[m, r, c] = e
                total += e
            w = weights[m]
            for c in range(cols):
                probs[m, r, c] /= total
                mixed[r, c] += w * probs[m, r, c]


@_compiled
def argmax_errors(probs, rows, target, losses):
    """0/1 loss of each expert's arg-max on the scored rows: ``losses[i, m] = 1`` when the first
    arg-max of ``probs[m, rows[i]]`` is not ``target[i]`` (a class beyond the columns: always)."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for m in range(probs.shape[0]):
            best = 0
            for c in range(1, probs.shape[2]):
                if probs[m, r, c] > probs[m, r, best]:
                    best = c
            wrong = probs.shape[2] == 0 or best != target[i]
            losses[i, m] = 1.0 if wrong else 0.0


@_compiled_exact
def standardize_rows(x, count, mean, m2, clip, eps, warmup, learn, out, columns):
    r"""The running standardizer (:class:`~stream_trainer.features.RunningStandardizer`) on raw
    rows ``x (N, D)`` (NaN: missing): with ``learn``, Chan et al.'s merge of the batch's
    :math:`(n_b, \mu_b, M_{2,b})` into ``count, mean, m2`` (in place), each value clipped to
    ``mean +- clip * std`` first in the columns with at least ``warmup`` values; then every row
    standardized with the updated moments (NaN -> 0, clipped to ``+-clip``) into ``out[:,
    columns]``. The operations and their order are those of the numpy methods it stands for."""
    rows, cols = x.shape
    for c in range(cols):
        n_a = count[c]
        mu = mean[c]
        if learn:
            lo, hi = -np.inf, np.inf
            if n_a >= warmup:
                var = m2[c] / n_a if n_a > 1.0 else 0.0
                sd = math.sqrt(var)
                if not sd > eps:
                    sd = 1.0
                lo, hi = mu - clip * sd, mu + clip * sd
            n_b = 0.0
            total = 0.0
            for r in range(rows):
                v = x[r, c]
                if v == v:  # NaN: missing
                    n_b += 1.0
                    total += min(max(v, lo), hi)
            if n_b > 0.0:
                mu_b = total / n_b
                m2_b = 0.0
                for r in range(rows):
                    v = x[r, c]
                    if v == v:
                        dev = min(max(v, lo), hi) - mu_b
                        m2_b += dev * dev
                n = n_a + n_b
                delta = mu_b - mu
                ratio = n_b / n
                mean[c] = mu + delta * ratio
                m2[c] = m2[c] + m2_b + delta * delta * n_a * ratio
                count[c] = n
        n = count[c]
        var = m2[c] / n if n > 1.0 else 0.0
        sd = math.sqrt(var)
        if not sd > eps:
            sd = 1.0
        mu = mean[c]
        col = columns[c]
        for r in range(rows):
            v = x[r, c]
            if v == v:
                z = (v - mu) / sd
                out[r, col] = max(min(z, clip), -clip)
            else:
                out[r, col] = 0.0
