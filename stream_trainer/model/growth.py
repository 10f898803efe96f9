"""Growing a linear layer in place without losing what was learned.

New classes appear mid-stream (the output layer gains rows) and new features appear mid-stream (the
input layer gains columns). :func:`grow_linear_` appends rows/columns to a ``nn.Linear`` *in place*:
the ``Parameter`` objects stay the same (so the optimizer keeps referencing them) and only their
``.data`` is replaced by a larger tensor whose leading block is the old one. Every optimizer state
tensor shaped like a grown parameter (Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``)
is padded with zeros the same way, so learned weights and optimizer moments survive.

New input columns get zero weights (the function computed on earlier records is unchanged); new
output rows get small random weights drawn from the layer's default init scaled by ``new_row_scale``
and a bias of ``new_bias`` (e.g. the mean of the existing biases so a new class starts neutral).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["grow_linear_"]


def _pad(t: torch.Tensor, rows: int, cols: int | None) -> torch.Tensor:
    if t.dim() == 1:
        out = t.new_zeros(rows)
        out[: t.shape[0]] = t
        return out
    assert cols is not None
    out = t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


@torch.no_grad()
def grow_linear_(
    linear: nn.Linear,
    *,
    in_features: int | None = None,
    out_features: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    new_row_scale: float = 0.1,
) -> bool:
    """Grow ``linear`` to ``(out_features, in_features)`` in place; return True if it grew."""
    old_out, old_in = linear.weight.shape
    new_in = max(old_in, in_features or old_in)
    new_out = max(old_out, out_features or old_out)
    if (new_out, new_in) == (old_out, old_in):
        return False
    weight = _pad(linear.weight.data, new_out, new_in)
    if new_out > old_out:
        bound = new_row_scale / math.sqrt(max(new_in, 1))
        rows = torch.empty(new_out - old_out, new_in, dtype=weight.dtype)
        rows.uniform_(-bound, bound, generator=generator)
        weight[old_out:] = rows.to(weight.device)
    params = [(linear.weight, weight)]
    if linear.bias is not None:
        bias = _pad(linear.bias.data, new_out, None)
        if new_out > old_out and old_out > 0:
            bias[old_out:] = linear.bias.data.mean()
        params.append((linear.bias, bias))
    for param, data in params:
        old_shape = param.shape
        param.data = data
        if optimizer is None:
            continue
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old_shape:
                state[key] = _pad(value, data.shape[0], data.shape[1] if data.dim() == 2 else None)
    linear.in_features, linear.out_features = new_in, new_out
    return True
