r"""Normalization layers for feature vectors, safe at batch size 1 and under changing batch sizes.

Every layer is a :class:`StreamNorm` taking ``(N, C)`` (and ``(N, C, L)``) input, built by name:

>>> import torch
>>> from stream_trainer.norms import build_norm
>>> norm = build_norm("ema_batch", 4, momentum=0.01)
>>> norm(torch.randn(1, 4)).shape
torch.Size([1, 4])

=================  ==========================================  ==========================  =======
name               training statistics                         batch size 1 in training    state
=================  ==========================================  ==========================  =======
``batch``          batch moments (= ``torch.nn.BatchNorm1d``)  running moments, no update  yes
``ema_batch``      running moments updated with the batch      fine (mixture update)       yes
``batch_renorm``   batch moments corrected by clipped r, d     running moments + update    yes
``layer``          per sample over ``C``                       fine                        no
``group``          per sample over groups of ``C``             fine                        no
``rms``            per sample root mean square                 fine                        no
``online``         running moments before the batch; control   the design case             yes
                   process in the backward
``none``           identity                                    fine                        no
=================  ==========================================  ==========================  =======

Conventions (details in :class:`StreamNorm` and each layer's docstring, which give the update
equations, what receives a gradient, how the momentum counts and the batch-size-1 policy):

* ``batch`` keeps PyTorch's momentum per call; ``ema_batch``, ``batch_renorm`` and ``online``
  count the momentum in **samples**: a batch of :math:`n` weighs :math:`1 - (1 - m)^n`, and the
  running variance is merged with the mixture formula (:mod:`stream_trainer.norms._moments`);
  ``ema_batch`` and ``batch_renorm`` warm-start (exact cumulative moments for the first
  ~:math:`1/m` samples). For ``(N, C, L)`` each position counts as a sample.
* Eval mode never looks at the rest of the batch, for every built-in layer.
* Batch-statistics layers reduce ``(count, sum, sum_of_squares)`` through
  ``layer.moment_reducer`` (identity; an all-reduce gives synchronized statistics).
* :func:`norm_wants_weight_standardization` tells the model builder to use
  :class:`WeightStandardizedLinear` before the layer (``group``).
* New layers: :func:`register_norm`; the contract tests run over every registered name.
"""

from __future__ import annotations

from stream_trainer.norms._moments import MomentReducer, identity_moment_reducer
from stream_trainer.norms.base import LEGACY_SAMPLES_SEEN, StreamNorm
from stream_trainer.norms.batch import BatchNorm, BatchRenorm, EMABatchNorm
from stream_trainer.norms.online import OnlineNorm
from stream_trainer.norms.per_sample import GroupNorm, LayerNorm, NoNorm, RMSNorm
from stream_trainer.norms.registry import (
    DEFAULT_REGISTRY,
    NORM_NAMES,
    NormBuilder,
    NormRegistry,
    build_norm,
    norm_accepts_option,
    norm_wants_weight_standardization,
    register_norm,
    registered_norm_names,
)
from stream_trainer.norms.weight_standardization import WeightStandardizedLinear

__all__ = [
    "DEFAULT_REGISTRY",
    "LEGACY_SAMPLES_SEEN",
    "NORM_NAMES",
    "BatchNorm",
    "BatchRenorm",
    "EMABatchNorm",
    "GroupNorm",
    "LayerNorm",
    "MomentReducer",
    "NoNorm",
    "NormBuilder",
    "NormRegistry",
    "OnlineNorm",
    "RMSNorm",
    "StreamNorm",
    "WeightStandardizedLinear",
    "build_norm",
    "identity_moment_reducer",
    "norm_accepts_option",
    "norm_wants_weight_standardization",
    "register_norm",
    "registered_norm_names",
]
