r"""Weight standardization (Qiao et al. 2019) for the ``Linear`` that feeds a group norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stream_trainer.norms._options import check_positive

__all__ = ["WeightStandardizedLinear"]


class WeightStandardizedLinear(nn.Linear):
    r"""``nn.Linear`` whose weight is standardized per output unit at every forward:

    .. math::

        \hat W_{i,:} = \frac{W_{i,:} - \operatorname{mean}_j W_{ij}}
                            {\sqrt{\operatorname{var}_j W_{ij} + \epsilon}}, \qquad
        y = x \hat W^\top + b,

    with the *biased* variance over the ``in_features`` of row :math:`i`. The gradient flows into
    :math:`W` through the standardization (so it is orthogonal to the row mean and row scale
    directions); ``bias`` is used as is. Defaults ``eps=1e-5``; the rest as ``nn.Linear``.
    With ``in_features == 1`` every standardized weight is 0 (a single value has zero spread).

    Examples
    --------
    >>> import torch
    >>> layer = WeightStandardizedLinear(4, 2)
    >>> w = layer.standardized_weight()
    >>> bool(torch.allclose(w.mean(dim=1), torch.zeros(2), atol=1e-6))
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.eps = check_positive("eps", eps)

    def standardized_weight(self) -> Tensor:
        """:math:`\\hat W`, differentiable with respect to ``weight``."""
        w = self.weight
        mean = w.mean(dim=1, keepdim=True)
        var = w.var(dim=1, unbiased=False, keepdim=True)
        return (w - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
