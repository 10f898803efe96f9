r"""Online Normalization (Chiley et al., NeurIPS 2019), made for batch size 1."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stream_trainer.errors import ConfigError
from stream_trainer.norms._moments import batch_moments, mixture_update, sample_weight
from stream_trainer.norms._options import check_bool, check_momentum, check_positive
from stream_trainer.norms.base import StreamNorm

__all__ = ["ECM_CHOICES", "OnlineNorm"]

ECM_CHOICES = ("clamp", "layer_scaling", "none")
"""Error-checking mechanisms after the affine step: activation clamping, layer scaling, none."""


def _to_rows(x: Tensor) -> Tensor:
    """``(N, C)`` unchanged; ``(N, C, L)`` -> ``(N * L, C)``, sample-major, position-minor."""
    return x if x.dim() == 2 else x.transpose(1, 2).reshape(-1, x.shape[1])


def _from_rows(rows: Tensor, like: Tensor) -> Tensor:
    if like.dim() == 2:
        return rows
    n, c, length = like.shape
    return rows.reshape(n, length, c).transpose(1, 2)


def control_process(
    grad_out: Tensor,
    y: Tensor,
    scale: Tensor,
    u: Tensor,
    v: Tensor,
    control_momentum: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The backward control process, one row at a time in batch order.

    For row :math:`t` with output gradient :math:`g_t`, normalized output :math:`y_t` and scale
    :math:`s`, with :math:`c` = ``control_momentum`` (:math:`1 - \alpha_{bkw}` in the paper):

    .. math::

        \tilde g_t = g_t - c\, v_{t-1}\, y_t, \qquad v_t = v_{t-1} + \tilde g_t\, y_t,

        \delta_t = \tilde g_t / s - c\, u_{t-1}, \qquad u_t = u_{t-1} + \delta_t .

    Returns ``(grad_in, u_T, v_T)``; a pure function of its arguments (nothing is modified).
    """
    grad_in = torch.empty_like(grad_out)
    u = u.to(grad_out.dtype).clone()
    v = v.to(grad_out.dtype).clone()
    inv_scale = 1.0 / scale.to(grad_out.dtype)
    for t in range(grad_out.shape[0]):
        g = grad_out[t] - control_momentum * v * y[t]
        v = v + g * y[t]
        delta = g * inv_scale - control_momentum * u
        u = u + delta
        grad_in[t] = delta
    return grad_in, u, v


class _ControlledNormalize(torch.autograd.Function):
    """:math:`y = (x - \\mu) / s` forward; the control process (or the plain ``g / s``) backward."""

    @staticmethod
    def forward(
        ctx: Any,
        rows: Tensor,
        mean: Tensor,
        scale: Tensor,
        u: Tensor,
        v: Tensor,
        control_momentum: float,
        control: bool,
    ) -> Tensor:
        y = (rows - mean) / scale
        # Snapshot of the control state: the backward is a deterministic function of what was
        # saved here, and writes its final state back into the buffers ``u`` and ``v``.
        ctx.save_for_backward(y, scale, u.clone(), v.clone())
        ctx.state = (u, v)
        ctx.control_momentum = control_momentum
        ctx.control = control
        return y

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (grad_out,) = grad_outputs
        y, scale, u0, v0 = ctx.saved_tensors
        if not ctx.control:
            grad_in = grad_out / scale
        else:
            grad_in, u1, v1 = control_process(grad_out, y, scale, u0, v0, ctx.control_momentum)
            u_buf, v_buf = ctx.state
            with torch.no_grad():
                u_buf.copy_(u1)
                v_buf.copy_(v1)
        return grad_in, None, None, None, None, None, None


class OnlineNorm(StreamNorm):
    r"""Online Normalization (Chiley et al., NeurIPS 2019), registry name ``"online"``.

    Forward, training. Every sample of the batch is normalized with the running moments from
    *before* the batch, so its output does not depend on the rest of its batch (for ``(N, C, L)``
    each position is a sample):

    .. math::

        \hat x = \frac{x - \hat\mu}{s}, \quad s = \sqrt{\hat\sigma^2 + \epsilon}, \qquad
        z = \gamma \hat x + \beta, \qquad y = \operatorname{ECM}(z).

    Then the running moments absorb the batch with the sample-counted mixture of
    :class:`~stream_trainer.norms.batch.EMABatchNorm` (:math:`a = 1 - (1 - m)^n`, biased
    :math:`\sigma_B^2`; with :math:`n = 1` this is the paper's
    :math:`\hat\sigma^2 \leftarrow \alpha\hat\sigma^2 + \alpha(1-\alpha)(x - \hat\mu)^2`,
    :math:`\hat\mu \leftarrow \alpha\hat\mu + (1-\alpha)x` with :math:`\alpha = 1 - m`).
    Default ``momentum=0.001`` (the paper's :math:`\alpha_{fwd} = 0.999`) and no warm start
    (``warm_start=False``): the statistics start at 0 / 1 as in the paper, because the output uses
    the moments *before* the sample and a warm-started variance of one sample is 0, which would
    divide the second sample by :math:`\sqrt\epsilon`.

    Backward, training (``backward_control=True``). :math:`\hat\mu, s` are constants, so the
    plain gradient would be :math:`\partial L/\partial x = g / s`. The control process instead
    removes, with error feedback, the components of the gradient along :math:`\hat x` and along
    the mean, row by row in batch order (:func:`control_process`), with the per-feature control
    state ``control_u``, ``control_v`` (buffers, start at 0) and ``control_momentum``
    :math:`c = 1 - \alpha_{bkw}` (default 0.01, the paper's 0.99):

    .. math::

        \tilde g_t = g_t - c\, v_{t-1} \hat x_t, \quad v_t = v_{t-1} + \tilde g_t \hat x_t,
        \qquad
        \partial_t = \tilde g_t / s - c\, u_{t-1}, \quad u_t = u_{t-1} + \partial_t,

    where :math:`g_t` is the gradient with respect to :math:`\hat x_t` (after the ECM and the
    affine step). Hence :math:`\sum_t \partial_t = u_T - u_0` and
    :math:`\sum_t \tilde g_t \hat x_t = v_T - v_0` stay bounded: the time-averaged input gradient
    has zero mean and the time-averaged output gradient is uncorrelated with :math:`\hat x`,
    both with an error that decays as :math:`1/T`, which is what batch normalization's backward
    enforces within a batch. The backward is a deterministic function of the state saved at
    forward time and stores its final state into ``control_u``/``control_v``; it is not the
    Jacobian of the forward (``exact_training_gradient = False``); ``backward_control=False``
    gives the plain :math:`g / s`. :math:`\gamma, \beta` receive their ordinary gradients; the
    running moments none. Cost: one vectorized step per row, in Python.

    ECM (error-checking mechanism, after :math:`\gamma, \beta`): ``"clamp"`` (default,
    :math:`y = \operatorname{clip}(z, \pm\,` ``clamp_value`` :math:`)`, default 5, as the
    reference implementation), ``"layer_scaling"`` (:math:`y = z / \sqrt{\operatorname{mean}_c
    z_c^2 + \epsilon_{ls}}` per sample) or ``"none"``.

    Eval: :math:`y = \operatorname{ECM}(\gamma (x - \hat\mu)/s + \beta)`, no update.
    Batch size 1: the design case, nothing special.
    """

    has_running_stats = True
    running_mean: Tensor
    running_var: Tensor
    control_u: Tensor
    control_v: Tensor
    samples_seen: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.001,
        control_momentum: float = 0.01,
        affine: bool = True,
        warm_start: bool = False,
        backward_control: bool = True,
        ecm: str = "clamp",
        clamp_value: float = 5.0,
        ls_eps: float = 1e-5,
    ) -> None:
        super().__init__(num_features)
        self.eps = check_positive("eps", eps)
        self.momentum = check_momentum("momentum", momentum)
        self.control_momentum = check_momentum("control_momentum", control_momentum)
        self._init_affine(affine)
        self.warm_start = check_bool("warm_start", warm_start)
        self.backward_control = check_bool("backward_control", backward_control)
        if ecm not in ECM_CHOICES:
            msg = f"ecm must be one of {ECM_CHOICES}, got {ecm!r}"
            raise ConfigError(msg)
        self.ecm = ecm
        self.clamp_value = check_positive("clamp_value", clamp_value)
        self.ls_eps = check_positive("ls_eps", ls_eps)
        self.exact_training_gradient = not self.backward_control
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_var", torch.ones(self.num_features))
        self.register_buffer("control_u", torch.zeros(self.num_features))
        self.register_buffer("control_v", torch.zeros(self.num_features))
        self._register_samples_seen()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.control_u.zero_()
        self.control_v.zero_()
        self.samples_seen.zero_()

    def running_moments(self) -> tuple[Tensor, Tensor] | None:
        return self.running_mean.detach(), self.running_var.detach()

    def _ecm(self, z: Tensor) -> Tensor:
        if self.ecm == "clamp":
            return z.clamp(-self.clamp_value, self.clamp_value)
        if self.ecm == "layer_scaling":
            return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + self.ls_eps)
        return z

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        scale = torch.sqrt(self.running_var.detach() + self.eps)
        if not self.training or x.shape[0] == 0:
            x_hat = (x - self._per_feature(self.running_mean, x)) / self._per_feature(scale, x)
            return self._ecm(self._affine(x_hat))
        rows = _to_rows(x)
        x_hat_rows = _ControlledNormalize.apply(
            rows,
            self.running_mean.detach().to(x.dtype),
            scale.to(x.dtype),
            self.control_u,
            self.control_v,
            self.control_momentum,
            self.backward_control,
        )
        y = self._ecm(self._affine(_from_rows(x_hat_rows, x)))
        with torch.no_grad():
            moments = batch_moments(x.detach(), self.moment_reducer)
            a = sample_weight(
                moments.n, self.samples_seen, self.momentum, warm_start=self.warm_start
            )
            mean, var = mixture_update(
                self.running_mean.to(torch.float64),
                self.running_var.to(torch.float64),
                moments.mean,
                moments.var,
                a,
            )
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
            self.samples_seen.add_(moments.n[0].round().long())
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"control_momentum={self.control_momentum}, affine={self.affine}, "
            f"backward_control={self.backward_control}, ecm={self.ecm!r}"
        )
