"""The multilayer perceptron the trainer learns, with a normalization layer chosen per layer.

Each hidden block is ``Linear -> Norm -> activation -> Dropout``; the head is a plain ``Linear``.
With ``skip=True`` (wide & deep) a bias-free linear shortcut from the inputs is added to the head's
output, ``f(x) = head(body(x)) + W_skip x``; ``W_skip`` starts at zero, so the network starts as the
plain MLP and can learn a linear model as quickly as a logistic regression while the body is still
untrained.
``norm`` is one registry name for every hidden layer or a sequence with one name per hidden layer.
Before a layer that asks for it (``group`` by default, see
:func:`~stream_trainer.norms.norm_wants_weight_standardization`) the linear layer uses weight
standardization, as Qiao et al. recommend; ``weight_standardization=False`` turns it off for every
layer. The input and output widths can grow
mid-stream (:meth:`StreamMLP.grow`), keeping learned weights and optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from stream_trainer.errors import ConfigError
from stream_trainer.model.growth import grow_linear_
from stream_trainer.norms import (
    GroupNorm,
    LayerNorm,
    NoNorm,
    RMSNorm,
    StreamNorm,
    WeightStandardizedLinear,
    build_norm,
    norm_wants_weight_standardization,
    registered_norm_names,
)

__all__ = ["ACTIVATIONS", "StreamMLP"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}

# Module types whose forward is the same in training and eval mode. Anything else (dropout, norm
# layers with running statistics, a norm registered by a plug-in) is treated as mode-dependent.
_MODE_INDEPENDENT: tuple[type[nn.Module], ...] = (
    nn.Sequential,
    nn.Linear,
    nn.Identity,
    *ACTIVATIONS.values(),
    LayerNorm,
    RMSNorm,
    GroupNorm,
    NoNorm,
)


def _norm_names(norm: str | Sequence[str], n_layers: int) -> list[str]:
    names = [norm] * n_layers if isinstance(norm, str) else list(norm)
    if len(names) != n_layers:
        msg = f"norm lists {len(names)} names for {n_layers} hidden layers: {names!r}"
        raise ConfigError(msg)
    valid = registered_norm_names()
    for name in names:
        if name not in valid:
            raise ConfigError(f"unknown norm {name!r}; valid: {', '.join(valid)}")
    return names


class StreamMLP(nn.Module):
    """``in_features -> hidden... -> out_features`` with per-layer normalization."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden: Sequence[int] = (64, 64),
        norm: str | Sequence[str] = "ema_batch",
        norm_options: Mapping[str, Mapping[str, Any]] | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        weight_standardization: bool | None = None,
        skip: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        if any(h < 1 for h in hidden):
            raise ConfigError(f"hidden sizes must be positive, got {list(hidden)!r}")
        self.norm_names = _norm_names(norm, len(hidden))
        layers: list[nn.Module] = []
        width = in_features
        for size, name in zip(hidden, self.norm_names, strict=True):
            options = dict((norm_options or {}).get(name, {}))
            if weight_standardization is None:
                ws = norm_wants_weight_standardization(name, options)
            else:
                ws = weight_standardization and norm_wants_weight_standardization(name, {})
            linear = WeightStandardizedLinear(width, size) if ws else nn.Linear(width, size)
            layers.append(linear)
            layers.append(build_norm(name, size, **options))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        self.skip: nn.Linear | None = None
        if skip:
            self.skip = nn.Linear(in_features, out_features, bias=False)
            nn.init.zeros_(self.skip.weight)
        self._mode_dependent: list[nn.Module] = [
            m
            for m in self.modules()
            if m is not self
            and not (type(m) in _MODE_INDEPENDENT or (isinstance(m, nn.Dropout) and m.p == 0.0))
        ]
        self.uses_rng = any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())
        self._first_linear = next((m for m in self.body if isinstance(m, nn.Linear)), self.head)
        # Incremented by every growth (which gives the grown parameters new storage): a step
        # engine laid out over the parameters compares it to tell whether it is current.
        self.layout_version = 0

    @property
    def mode_independent(self) -> bool:
        """True when training and eval mode compute the same function (no dropout, no running
        statistics): one forward pass can then serve both the prediction and the loss."""
        return not self._mode_dependent

    def set_training(self, mode: bool) -> None:
        """A cheap ``train(mode)`` for the per-step switch between serving and learning.

        Only this module and the modules whose forward depends on the mode (precomputed at
        construction) are switched; the flags of the others (linear layers, activations, per-sample
        norms) are left as they are, since nothing reads them. ``train()``/``eval()`` still set
        every flag.
        """
        if self.training == mode:
            return
        self.training = mode
        for module in self._mode_dependent:
            module.training = mode

    @property
    def first_linear(self) -> nn.Linear:
        return self._first_linear

    @property
    def in_features(self) -> int:
        return self.first_linear.in_features

    @property
    def out_features(self) -> int:
        return self.head.out_features

    def norm_layers(self) -> list[tuple[str, StreamNorm]]:
        """``(name, layer)`` for every normalization layer, in order (``norm0``, ``norm1``...)."""
        norms = [m for m in self.body if isinstance(m, StreamNorm)]
        return [(f"norm{i}_{n.__class__.__name__}", n) for i, n in enumerate(norms)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x))
        if self.skip is not None:
            out = out + self.skip(x)
        return out

    def grow(
        self,
        *,
        in_features: int | None = None,
        out_features: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        generator: torch.Generator | None = None,
    ) -> bool:
        """Grow the input and/or output width in place (see :mod:`stream_trainer.model.growth`).

        The skip layer grows with both: new input columns and new class rows start at zero, so the
        shortcut's contribution to the old logits is unchanged and a new class starts from the
        head's neutral init alone.
        """
        self.layout_version += 1
        grew = False
        if in_features is not None:
            grew |= grow_linear_(self.first_linear, in_features=in_features, optimizer=optimizer)
        if out_features is not None:
            grew |= grow_linear_(
                self.head, out_features=out_features, optimizer=optimizer, generator=generator
            )
        if self.skip is not None:
            grow_linear_(
                self.skip,
                in_features=in_features,
                out_features=out_features,
                optimizer=optimizer,
                new_row_scale=0.0,
            )
        return grew
