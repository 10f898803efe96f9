r"""The batch-statistics family: :class:`BatchNorm`, :class:`EMABatchNorm`, :class:`BatchRenorm`.

All three reduce a batch to per-feature :math:`(n, \sum x, \sum x^2)` over ``N`` (and ``L`` for
``(N, C, L)``), pass them through ``self.moment_reducer`` and derive :math:`\mu_B` and the biased
:math:`\sigma_B^2` from the reduced sums (float64 accumulation, see
:mod:`stream_trainer.norms._moments`). This autograd form is the reference; the compiled engine
(:mod:`stream_trainer.engine`) computes the same training step for ``ema_batch`` and
``batch_renorm`` in a single process. In eval mode all three normalize with the running
statistics,

.. math:: y = \gamma \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta,

so a sample's eval output never depends on the rest of its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stream_trainer.errors import ConfigError
from stream_trainer.norms._moments import (
    batch_moments,
    mixture_update,
    sample_weight,
)
from stream_trainer.norms._options import (
    check_bool,
    check_momentum,
    check_non_negative_int,
    check_positive,
)
from stream_trainer.norms.base import StreamNorm

__all__ = ["BatchNorm", "BatchRenorm", "EMABatchNorm"]


class _RunningStatsNorm(StreamNorm):
    """Owns ``running_mean`` (zeros), ``running_var`` (ones) and ``samples_seen`` (0)."""

    has_running_stats = True
    running_mean: Tensor | None
    running_var: Tensor | None
    samples_seen: Tensor | None

    def __init__(self, num_features: int, *, eps: float, affine: bool) -> None:
        super().__init__(num_features)
        self.eps = check_positive("eps", eps)
        self._init_affine(affine)
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_var", torch.ones(self.num_features))
        self._register_samples_seen()

    def reset_running_stats(self) -> None:
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
        if self.samples_seen is not None:
            self.samples_seen.zero_()

    def running_moments(self) -> tuple[Tensor, Tensor] | None:
        if self.running_mean is None or self.running_var is None:
            return None
        return self.running_mean.detach(), self.running_var.detach()

    def _state_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(running_mean, running_var, samples_seen, weight, bias)``, read from the buffer and
        parameter dicts: ``nn.Module.__getattr__`` is a measurable part of a batch-size-1 step.
        (A parametrized ``weight`` or ``bias`` is not in ``_parameters``: plain attribute then.)"""
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        seen = buffers["samples_seen"]
        assert running_mean is not None and running_var is not None and seen is not None
        try:
            weight, bias = params["weight"], params["bias"]
        except KeyError:
            weight, bias = self.weight, self.bias
        return running_mean, running_var, seen, weight, bias

    def _normalize_with(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """:math:`(x - \\mu) / \\sqrt{\\sigma^2 + \\epsilon}` with per-feature ``mean``, ``var``."""
        invstd = torch.rsqrt(var + self.eps)
        return (x - self._per_feature(mean, x)) * self._per_feature(invstd, x)

    def _eval_forward(self, x: Tensor) -> Tensor:
        r""":math:`(x - \hat\mu) \cdot \gamma / \sqrt{\hat\sigma^2 + \epsilon} + \beta` as the
        per-feature factor, then one subtraction and one multiply-add over the batch: the serving
        forward of every step, so it is kept to a few ops."""
        buffers, params = self._buffers, self._parameters
        mean, var = buffers["running_mean"], buffers["running_var"]
        assert mean is not None and var is not None
        weight: Tensor | None
        bias: Tensor | None
        try:
            weight, bias = params["weight"], params["bias"]
        except KeyError:  # parametrized
            weight, bias = self.weight, self.bias
        scale = torch.add(var, self.eps).rsqrt_()
        if weight is not None:
            scale = scale * weight
        if x.dim() != 2 or x.dtype != scale.dtype:  # broadcast (N, C, L), cast to x's dtype
            mean, scale = self._per_feature(mean, x), self._per_feature(scale, x)
            bias = None if bias is None else self._per_feature(bias, x)
        if bias is None:
            return (x - mean) * scale
        return torch.addcmul(bias, x - mean, scale)


class BatchNorm(_RunningStatsNorm):
    r"""Classic batch normalization with PyTorch semantics (registry name ``"batch"``).

    Training, batch of :math:`n \ge 2` samples per feature (:math:`n = N` or :math:`N L`):

    .. math::

        y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta, \qquad
        \hat\mu \leftarrow (1 - m)\hat\mu + m\,\mu_B, \qquad
        \hat\sigma^2 \leftarrow (1 - m)\hat\sigma^2 + m\,\tfrac{n}{n-1}\sigma_B^2 .

    The output uses the *biased* batch variance, the running variance receives the *unbiased* one,
    and ``momentum`` :math:`m` counts **calls**, not samples, exactly like
    ``torch.nn.BatchNorm1d`` (``momentum=None``: cumulative average over calls,
    :math:`m = 1/\text{num\_batches\_tracked}`). Outputs, gradients and running buffers equal
    ``torch.nn.BatchNorm1d`` with the same ``eps``, ``momentum`` and ``affine``.

    Gradient: into ``x`` through the output *and* through :math:`\mu_B, \sigma_B^2` (the full
    batch-norm backward), and into :math:`\gamma, \beta`. Running buffers get none.

    Batch size 1 (:math:`n = 1`) in training: no crash; the sample is normalized with the running
    statistics, as in eval (gradient through ``x`` only, :math:`1/\sqrt{\hat\sigma^2+\epsilon}`),
    and the running statistics, ``num_batches_tracked`` and ``samples_seen`` are left unchanged.
    With ``track_running_stats=False`` there are no running statistics: batch statistics are used
    in training and eval, and a batch of one normalizes to :math:`y = \beta`.

    ``samples_seen`` counts the samples that updated the running statistics.

    Examples
    --------
    >>> import torch
    >>> norm = BatchNorm(3)
    >>> norm(torch.randn(1, 3)).shape  # batch size 1 in training does not crash
    torch.Size([1, 3])
    >>> norm.num_batches_tracked.item()
    0
    """

    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine)
        self.momentum = None if momentum is None else check_momentum("momentum", momentum)
        self.track_running_stats = check_bool("track_running_stats", track_running_stats)
        if self.track_running_stats:
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
            self.register_buffer("samples_seen", None)
            self.has_running_stats = False

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()

    def _upgrade_state_dict(
        self, state_dict: dict[str, object], prefix: str, version: int | None
    ) -> None:
        super()._upgrade_state_dict(state_dict, prefix, version)
        key = prefix + "num_batches_tracked"
        if self.num_batches_tracked is not None and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.track_running_stats and (not self.training or x.shape[0] == 0):
            return self._eval_forward(x)
        moments = batch_moments(x, self.moment_reducer)
        y = self._normalize_with(x, moments.mean, moments.var)
        if not self.track_running_stats:
            return self._affine(y)
        assert self.running_mean is not None and self.running_var is not None
        several = moments.n > 1.0
        y_single = self._normalize_with(x, self.running_mean, self.running_var)
        y = torch.where(self._broadcast(several, x), y, y_single)
        with torch.no_grad():
            assert self.num_batches_tracked is not None and self.samples_seen is not None
            updated = several[0].long()
            self.num_batches_tracked.add_(updated)
            if self.momentum is None:
                factor = 1.0 / self.num_batches_tracked.clamp_min(1).to(torch.float64)
            else:
                factor = torch.tensor(self.momentum, dtype=torch.float64, device=x.device)
            unbiased = moments.var * moments.n / (moments.n - 1.0).clamp_min(1.0)
            mean = self.running_mean.to(torch.float64)
            var = self.running_var.to(torch.float64)
            new_mean = mean + factor * (moments.mean - mean)
            new_var = var + factor * (unbiased - var)
            self.running_mean.copy_(torch.where(several, new_mean, mean))
            self.running_var.copy_(torch.where(several, new_var, var))
            self.samples_seen.add_(moments.n[0].round().long() * updated)
        return self._affine(y)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


class EMABatchNorm(_RunningStatsNorm):
    r"""EMA batch normalization (registry name ``"ema_batch"``): the same statistics in training
    and serving, with a momentum that counts samples.

    A batch of :math:`n` samples (per feature; :math:`n = N` or :math:`N L`) with biased moments
    :math:`\mu_B, \sigma_B^2` gets the weight

    .. math::

        a = 1 - (1 - m)^n
        \quad\text{or, with warm start,}\quad
        a = \max\!\Big(1 - (1 - m)^n,\ \frac{n}{t + n}\Big),

    :math:`t` = ``samples_seen`` before the batch, and the running moments become the mixture

    .. math::

        \mu' = (1 - a)\hat\mu + a\mu_B, \qquad
        \sigma'^2 = (1 - a)\hat\sigma^2 + a\sigma_B^2 + a(1 - a)(\mu_B - \hat\mu)^2 .

    Training forward normalizes with the *updated* moments,
    :math:`y = \gamma (x - \mu') / \sqrt{\sigma'^2 + \epsilon} + \beta`, then stores them:
    :math:`\hat\mu \leftarrow \mu'`, :math:`\hat\sigma^2 \leftarrow \sigma'^2`,
    :math:`t \leftarrow t + n`. Eval forward normalizes with :math:`\hat\mu, \hat\sigma^2`.

    .. note::
        **Momentum counts samples.** The weight left on the past after a batch of :math:`n` is
        :math:`(1-m)^n`, exactly what :math:`n` batches of one leave, so the statistics forget at
        the same rate whatever the batch sizes. Within the batch the :math:`n` rows share the
        weight :math:`a` equally (:math:`n` batches of one would weight them geometrically,
        :math:`m(1-m)^{n-i}`); both are the moments of a mixture of the past distribution and the
        new rows, which is why the variance uses the mixture formula. The two agree exactly when
        the rows are equal, and in the warm-start regime. At :math:`n = 1`
        (:math:`\sigma_B^2 = 0`) the update is the exponentially weighted variance
        :math:`\sigma'^2 = (1 - m)(\hat\sigma^2 + m (x - \hat\mu)^2)`.

        **Warm start** (default): while :math:`t + n \lesssim 1/m`, :math:`n/(t+n)` is the larger
        weight and the running moments are the exact cumulative mean and *biased* variance of every
        sample seen (Chan et al.'s merge), with no pull towards the initial 0 / 1. The very first
        batch sets them to its own moments, unless it is a single sample: a variance from one
        value would be 0, so that sample is mixed half and half with the initial moments (weight
        :math:`1/2`, :func:`~stream_trainer.norms._moments.sample_weight`); the two then share
        one sample's weight in the cumulative moments.

    Default ``momentum=0.01``: one sample moves the statistics by 1 %, a window of about 100
    samples, which with the service's batches of 1 to 8 is 12 to 100 steps, comparable to
    ``torch.nn.BatchNorm1d``'s 0.1 per call at batch size 10.

    Gradient: the old moments :math:`\hat\mu, \hat\sigma^2` are detached buffers; the batch's
    contribution carries the gradient, so ``x`` receives its direct term
    :math:`\gamma/\sqrt{\sigma'^2+\epsilon}` plus the batch-norm terms through :math:`\mu_B` and
    :math:`\sigma_B^2`, scaled by :math:`a` (and by :math:`a(1-a)` through the mean-shift term), as
    motivated by MABN (Yan et al., ICLR 2020) and Online Normalization (Chiley et al., NeurIPS
    2019). :math:`\gamma, \beta` receive the usual gradients. At :math:`a = 1` (the first batch, or
    ``momentum=1``) this is exactly batch norm in training.

    Batch size 1: well defined in training (the sample is mixed into the statistics with weight
    :math:`a`; :math:`|y - \beta| \le |\gamma| \sqrt{(1-a)/a}`), updates the running moments.

    Examples
    --------
    >>> import torch
    >>> rows = torch.tensor([[1.0], [2.0], [6.0]])
    >>> norm = EMABatchNorm(1)
    >>> _ = norm(rows[:2]); _ = norm(rows[2:])  # warm start: exact cumulative moments
    >>> norm.running_mean.item(), round(norm.running_var.item(), 4)
    (3.0, 4.6667)
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        warm_start: bool = True,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine)
        self.momentum = check_momentum("momentum", momentum)
        self.warm_start = check_bool("warm_start", warm_start)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training or x.shape[0] == 0:
            return self._eval_forward(x)
        running_mean, running_var, seen = self._state_tensors()[:3]
        moments = batch_moments(x, self.moment_reducer)
        a = sample_weight(moments.n, seen, self.momentum, warm_start=self.warm_start)
        mean, var = mixture_update(
            running_mean.detach().to(torch.float64),
            running_var.detach().to(torch.float64),
            moments.mean,
            moments.var,
            a,
        )
        y = self._normalize_with(x, mean, var)
        with torch.no_grad():
            running_mean.copy_(mean)
            running_var.copy_(var)
            seen.add_(moments.n[0].round().long())
        return self._affine(y)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, warm_start={self.warm_start}"
        )


class BatchRenorm(_RunningStatsNorm):
    r"""Batch Renormalization (Ioffe, NeurIPS 2017), registry name ``"batch_renorm"``.

    Training, :math:`n \ge 2` samples per feature, with :math:`\sigma_B = \sqrt{\sigma_B^2 +
    \epsilon}` (biased batch variance) and :math:`\hat\sigma = \sqrt{\hat\sigma^2 + \epsilon}`
    from the running moments *before* the update:

    .. math::

        r = \operatorname{clip}_{[1/r_{\max},\, r_{\max}]}(\sigma_B / \hat\sigma),
        \quad
        d = \operatorname{clip}_{[-d_{\max},\, d_{\max}]}((\mu_B - \hat\mu) / \hat\sigma),
        \quad
        y = \gamma\Big(r\,\frac{x - \mu_B}{\sigma_B} + d\Big) + \beta .

    :math:`r` and :math:`d` are detached (no gradient, as in the paper); ``x`` receives the
    batch-norm gradient through :math:`\mu_B, \sigma_B` scaled by :math:`r`. Because of the
    detachment the training backward is the exact Jacobian only where :math:`r, d` are constant
    (:math:`r_{\max} = 1, d_{\max} = 0`, or both clipped); ``exact_training_gradient`` says so.

    Running moments: the stored statistic is the running **variance** :math:`\hat\sigma^2`
    (:math:`\hat\sigma` is derived with :math:`\epsilon`), updated after the output is computed
    with the sample-counted mixture of :class:`EMABatchNorm` (weight :math:`a = 1-(1-m)^n`, warm
    start :math:`\max(a, n/(t+n))`, biased :math:`\sigma_B^2`), default ``momentum=0.01`` per
    sample.

    Warm-up in **samples** :math:`t` (``samples_seen`` before the batch): with
    :math:`p = \operatorname{clip}_{[0,1]}((t - t_0)/(t_1 - t_0))`, :math:`t_0` =
    ``warmup_start_samples``, :math:`t_1` = ``warmup_end_samples`` (a step at :math:`t_0` when
    they are equal), :math:`r_{\max}(t) = 1 + (r_{\max} - 1)p` and :math:`d_{\max}(t) = d_{\max} p`.
    Before :math:`t_0` the layer is batch norm in training. Defaults ``rmax=3, dmax=5`` (the
    paper's final values), ``warmup_start_samples=1000`` (running moments with momentum 0.01 are
    reliable after a few hundred samples), ``warmup_end_samples=10000``. With ``rmax=1, dmax=0``
    the training output equals :class:`BatchNorm` in training.

    Batch size 1: :math:`\sigma_B^2 = 0`, so the layer uses the unclipped limit
    :math:`r\,(x-\mu_B)/\sigma_B + d = (x - \hat\mu)/\hat\sigma`:
    :math:`y = \gamma (x - \hat\mu)/\hat\sigma + \beta` with the running moments (gradient through
    ``x`` only), and still updates the running moments. Eval: running moments.
    """

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        warm_start: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_start_samples: int = 1_000,
        warmup_end_samples: int = 10_000,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine)
        self.momentum = check_momentum("momentum", momentum)
        self.warm_start = check_bool("warm_start", warm_start)
        if isinstance(rmax, bool) or not isinstance(rmax, int | float) or not 1 <= rmax < 1e30:
            msg = f"rmax must be a finite number >= 1, got {rmax!r}"
            raise ConfigError(msg)
        if isinstance(dmax, bool) or not isinstance(dmax, int | float) or not 0 <= dmax < 1e30:
            msg = f"dmax must be a finite number >= 0, got {dmax!r}"
            raise ConfigError(msg)
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.warmup_start_samples = check_non_negative_int(
            "warmup_start_samples", warmup_start_samples
        )
        self.warmup_end_samples = check_non_negative_int("warmup_end_samples", warmup_end_samples)
        if self.warmup_end_samples < self.warmup_start_samples:
            msg = (
                f"warmup_end_samples must be >= warmup_start_samples, got "
                f"warmup_start_samples={warmup_start_samples!r}, "
                f"warmup_end_samples={warmup_end_samples!r}"
            )
            raise ConfigError(msg)
        self.exact_training_gradient = self.rmax == 1.0 and self.dmax == 0.0

    def clip_limits(self) -> tuple[Tensor, Tensor]:
        """Current :math:`(r_{\\max}(t), d_{\\max}(t))` as float64 scalar tensors."""
        assert self.samples_seen is not None
        t = self.samples_seen.to(torch.float64)
        start, end = float(self.warmup_start_samples), float(self.warmup_end_samples)
        if end > start:
            p = ((t - start) / (end - start)).clamp(0.0, 1.0)
        else:
            p = (t >= start).to(torch.float64)
        return 1.0 + (self.rmax - 1.0) * p, self.dmax * p

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training or x.shape[0] == 0:
            return self._eval_forward(x)
        running_mean, running_var, seen = self._state_tensors()[:3]
        moments = batch_moments(x, self.moment_reducer)
        mean = running_mean.detach().to(torch.float64)
        var = running_var.detach().to(torch.float64)
        sigma = torch.sqrt(var + self.eps)
        sigma_b = torch.sqrt(moments.var + self.eps)
        rmax, dmax = self.clip_limits()
        with torch.no_grad():
            r = torch.clamp(sigma_b / sigma, min=1.0 / rmax, max=rmax)
            d = torch.clamp((moments.mean - mean) / sigma, min=-dmax, max=dmax)
        x_hat = (x - self._per_feature(moments.mean, x)) / self._per_feature(sigma_b, x)
        y_renorm = x_hat * self._per_feature(r, x) + self._per_feature(d, x)
        y_single = self._normalize_with(x, mean, var)
        y = torch.where(self._broadcast(moments.n > 1.0, x), y_renorm, y_single)
        with torch.no_grad():
            a = sample_weight(moments.n, seen, self.momentum, warm_start=self.warm_start)
            new_mean, new_var = mixture_update(mean, var, moments.mean, moments.var, a)
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
            seen.add_(moments.n[0].round().long())
        return self._affine(y)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, warm_start={self.warm_start}, rmax={self.rmax}, "
            f"dmax={self.dmax}, warmup_samples=({self.warmup_start_samples}, "
            f"{self.warmup_end_samples})"
        )
