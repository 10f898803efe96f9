"""The :class:`StreamNorm` base class shared by every normalization layer in the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stream_trainer.norms._moments import MomentReducer, identity_moment_reducer
from stream_trainer.norms._options import check_bool, check_num_features

__all__ = ["LEGACY_SAMPLES_SEEN", "StreamNorm"]

LEGACY_SAMPLES_SEEN = 1 << 40
"""``samples_seen`` given to a checkpoint that has running statistics but no ``samples_seen``
(written before the buffer existed, or by ``torch.nn.BatchNorm1d``): such statistics are assumed
mature, so warm start and warm-up schedules count as finished."""


class StreamNorm(nn.Module):
    """Base class of the normalization layers for feature vectors ``(N, C)`` or ``(N, C, L)``.

    It owns the optional affine parameters (``weight`` :math:`\\gamma`, ``bias`` :math:`\\beta`,
    registered as ``None`` when disabled) and the conventions every layer follows:

    * every statistic is a buffer; a disabled one is registered as ``None`` (as in
      ``torch.nn.BatchNorm1d`` with ``track_running_stats=False``);
    * layers with running statistics (``has_running_stats``) keep an int64 ``samples_seen`` buffer
      counting the samples that went into them (a sample is one row of ``(N, C)`` or one position
      of ``(N, C, L)``);
    * :meth:`reset_running_stats` restores the statistics only, :meth:`reset_parameters` both the
      statistics and the affine parameters;
    * :meth:`running_moments` exposes ``(running_mean, running_var)`` for telemetry;
    * layers that reduce a batch call :attr:`moment_reducer` on the per-feature
      ``(count, sum, sum_of_squares)`` (identity by default; set it to an all-reduce for
      synchronized statistics across processes);
    * ``_version`` is written into the state-dict metadata and :meth:`_load_from_state_dict`
      upgrades older checkpoints (a missing ``samples_seen`` becomes :data:`LEGACY_SAMPLES_SEEN`).

    Class attributes read by the model builder and the contract tests:

    * ``wants_weight_standardization``: the preceding ``Linear`` should be a
      :class:`~stream_trainer.norms.weight_standardization.WeightStandardizedLinear`;
    * ``exact_training_gradient``: the training-mode backward is the exact Jacobian of the
      training-mode forward (``False`` for layers that alter the gradient by design);
    * ``batch_independent_in_eval``: in eval mode a sample's output does not depend on the other
      samples of its batch.
    """

    _version = 1

    has_running_stats: bool = False
    wants_weight_standardization: bool = False
    exact_training_gradient: bool = True
    batch_independent_in_eval: bool = True

    num_features: int
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    moment_reducer: MomentReducer

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = check_num_features(num_features)
        self.moment_reducer = identity_moment_reducer

    # ----------------------------------------------------------------- construction helpers
    def _init_affine(self, affine: bool, *, bias: bool = True) -> None:
        """Register ``weight`` (ones) and ``bias`` (zeros), or ``None`` when disabled."""
        affine = check_bool("affine", affine)
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(self.num_features))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.zeros(self.num_features))
        else:
            self.register_parameter("bias", None)

    def _register_samples_seen(self) -> None:
        self.register_buffer("samples_seen", torch.tensor(0, dtype=torch.long))

    # ----------------------------------------------------------------- public API
    def reset_running_stats(self) -> None:
        """Restore the running statistics to their initial values (no-op when stateless)."""

    def reset_parameters(self) -> None:
        """Restore the running statistics and the affine parameters (``weight=1``, ``bias=0``)."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def running_moments(self) -> tuple[Tensor, Tensor] | None:
        """``(running_mean, running_var)`` detached, or ``None`` for a stateless layer."""
        return None

    # ----------------------------------------------------------------- forward helpers
    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in (2, 3) or x.shape[1] != self.num_features:
            msg = (
                f"{type(self).__name__} expects input (N, {self.num_features}) or "
                f"(N, {self.num_features}, L), got {tuple(x.shape)}"
            )
            raise ValueError(msg)

    @staticmethod
    def _per_feature(t: Tensor, x: Tensor) -> Tensor:
        """Reshape a ``(C,)`` tensor to broadcast against ``x`` and cast it to ``x.dtype``."""
        return StreamNorm._broadcast(t.to(x.dtype), x)

    @staticmethod
    def _broadcast(t: Tensor, x: Tensor) -> Tensor:
        """Reshape a ``(C,)`` tensor (any dtype, e.g. a mask) to broadcast against ``x``."""
        return t.view(1, -1) if x.dim() == 2 else t.view(1, -1, 1)

    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * self._per_feature(self.weight, y)
        if self.bias is not None:
            y = y + self._per_feature(self.bias, y)
        return y

    # ----------------------------------------------------------------- checkpoints
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        self._upgrade_state_dict(state_dict, prefix, version)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _upgrade_state_dict(
        self, state_dict: dict[str, Any], prefix: str, version: int | None
    ) -> None:
        """Fill in what older checkpoints lack. Version 1 is the first format; a checkpoint
        without ``samples_seen`` (any version, or a plain torch norm layer) gets
        :data:`LEGACY_SAMPLES_SEEN` when it carries running statistics."""
        key = prefix + "samples_seen"
        if (
            getattr(self, "samples_seen", None) is not None
            and key not in state_dict
            and prefix + "running_mean" in state_dict
        ):
            state_dict[key] = torch.tensor(LEGACY_SAMPLES_SEEN, dtype=torch.long)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
