r"""Per-sample normalizations: :class:`LayerNorm`, :class:`RMSNorm`, :class:`GroupNorm`,
:class:`NoNorm`.

They keep no statistics (``has_running_stats = False``, :meth:`running_moments` returns ``None``),
behave identically in training and eval, and a sample's output never depends on the rest of its
batch, so batch size 1 is a non-event. For ``(N, C, L)`` input, :class:`LayerNorm` and
:class:`RMSNorm` normalize over ``C`` at every position ``(n, l)`` (the feature dimension, as
``torch.nn.LayerNorm(C)`` applied channels-last), while :class:`GroupNorm` follows
``torch.nn.GroupNorm`` (statistics over the group's channels and ``L``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stream_trainer.errors import ConfigError
from stream_trainer.norms._options import check_bool, check_positive
from stream_trainer.norms.base import StreamNorm

__all__ = ["GroupNorm", "LayerNorm", "NoNorm", "RMSNorm"]


def _channels_last(x: Tensor) -> Tensor:
    return x if x.dim() == 2 else x.transpose(1, 2)


class LayerNorm(StreamNorm):
    r"""Layer normalization over the feature dimension (registry name ``"layer"``).

    .. math::

        \mu = \frac{1}{C}\sum_c x_c, \quad \sigma^2 = \frac{1}{C}\sum_c (x_c - \mu)^2, \quad
        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    per sample (biased variance), identical to ``torch.nn.LayerNorm(C, eps)``. Gradient into ``x``
    (through :math:`\mu, \sigma^2` too), :math:`\gamma` and :math:`\beta`. Batch size 1: nothing
    special. Defaults ``eps=1e-5``, ``affine=True``, ``bias=True``.
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, affine: bool = True, bias: bool = True
    ) -> None:
        super().__init__(num_features)
        self.eps = check_positive("eps", eps)
        self._init_affine(affine, bias=check_bool("bias", bias))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        y = F.layer_norm(_channels_last(x), (self.num_features,), self.weight, self.bias, self.eps)
        return _channels_last(y)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class RMSNorm(StreamNorm):
    r"""Root-mean-square normalization (Zhang & Sennrich 2019), registry name ``"rms"``.

    .. math:: y = \gamma \frac{x}{\sqrt{\frac{1}{C}\sum_c x_c^2 + \epsilon}}

    per sample, no centring and no bias. Gradient into ``x`` (through the mean square too) and
    :math:`\gamma`. Equal to ``torch.nn.RMSNorm(C, eps)``. Batch size 1: nothing special.
    Defaults ``eps=1e-6``, ``affine=True`` (:math:`\gamma` only).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_features)
        self.eps = check_positive("eps", eps)
        self._init_affine(affine, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        y = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return self._affine(y)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class GroupNorm(StreamNorm):
    r"""Group normalization (Wu & He 2018), registry name ``"group"``.

    The ``C`` features are split into ``num_groups`` consecutive groups :math:`G_g` of
    :math:`C/G` features; per sample and group (and over ``L`` for ``(N, C, L)``)

    .. math::

        \mu_g = \operatorname{mean}_{c \in G_g} x_c,\quad
        \sigma_g^2 = \operatorname{mean}_{c \in G_g}(x_c - \mu_g)^2,\quad
        y_c = \gamma_c \frac{x_c - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}} + \beta_c ,

    identical to ``torch.nn.GroupNorm``. Gradient into ``x`` (through the group moments too),
    :math:`\gamma, \beta`. Batch size 1: nothing special. ``C`` not divisible by ``num_groups`` is
    a :class:`~stream_trainer.errors.ConfigError` naming the valid group counts.

    Group norm does not remove the scale of the weights feeding it the way batch norm does; Qiao
    et al. (2019) pair it with weight standardization, so ``wants_weight_standardization`` is
    ``True`` (option ``weight_standardization``): the model builder should use
    :class:`~stream_trainer.norms.weight_standardization.WeightStandardizedLinear` before it.

    Defaults ``num_groups=8``, ``eps=1e-5``, ``affine=True``, ``weight_standardization=True``.
    """

    wants_weight_standardization = True

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 8,
        eps: float = 1e-5,
        affine: bool = True,
        weight_standardization: bool = True,
    ) -> None:
        super().__init__(num_features)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            msg = f"num_groups must be a positive int, got {num_groups!r}"
            raise ConfigError(msg)
        if self.num_features % num_groups:
            valid = [g for g in range(1, self.num_features + 1) if self.num_features % g == 0]
            msg = (
                f"num_features={self.num_features!r} is not divisible by "
                f"num_groups={num_groups!r}; valid num_groups: {valid}"
            )
            raise ConfigError(msg)
        self.num_groups = num_groups
        self.eps = check_positive("eps", eps)
        self._init_affine(affine)
        self.wants_weight_standardization = check_bool(
            "weight_standardization", weight_standardization
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        # F.group_norm refuses N=1 for (N, C) input in training; layer_norm over each group's
        # (C/G) x L values is the same computation without that check.
        n = x.shape[0]
        grouped = x.reshape(n, self.num_groups, -1)
        y = F.layer_norm(grouped, (grouped.shape[-1],), None, None, self.eps).reshape(x.shape)
        return self._affine(y)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
            f"affine={self.affine}"
        )


class NoNorm(StreamNorm):
    """The identity, registry name ``"none"``: :math:`y = x`, gradient passes unchanged. Takes no
    options and keeps no statistics."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return x
