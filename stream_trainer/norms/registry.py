"""Name -> builder registry of the normalization layers."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from stream_trainer.errors import ConfigError
from stream_trainer.norms._options import check_bool, check_num_features
from stream_trainer.norms.base import StreamNorm
from stream_trainer.norms.batch import BatchNorm, BatchRenorm, EMABatchNorm
from stream_trainer.norms.online import OnlineNorm
from stream_trainer.norms.per_sample import GroupNorm, LayerNorm, NoNorm, RMSNorm

__all__ = [
    "DEFAULT_REGISTRY",
    "NORM_NAMES",
    "NormBuilder",
    "NormRegistry",
    "build_norm",
    "norm_wants_weight_standardization",
    "register_norm",
    "registered_norm_names",
]

NormBuilder = Callable[..., StreamNorm]
"""``builder(num_features, **options) -> StreamNorm``; a :class:`StreamNorm` subclass qualifies."""

_BUILTINS: dict[str, NormBuilder] = {
    "batch": BatchNorm,
    "ema_batch": EMABatchNorm,
    "batch_renorm": BatchRenorm,
    "layer": LayerNorm,
    "group": GroupNorm,
    "rms": RMSNorm,
    "online": OnlineNorm,
    "none": NoNorm,
}

NORM_NAMES: tuple[str, ...] = tuple(_BUILTINS)
"""The built-in layer names, in registration order."""


def _accepted_options(builder: NormBuilder) -> tuple[str, ...] | None:
    """Keyword options ``builder`` accepts besides ``num_features``; ``None`` if it takes ``**``."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return None
    names: list[str] = []
    for index, parameter in enumerate(signature.parameters.values()):
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if index == 0 or parameter.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.POSITIONAL_ONLY,
        ):
            continue
        names.append(parameter.name)
    return tuple(names)


class NormRegistry:
    """Maps layer names to builders; :meth:`build` validates the name and the option keys.

    Tests and plug-ins use their own instance (``NormRegistry.with_builtins()``); the module
    functions :func:`build_norm` and :func:`register_norm` act on :data:`DEFAULT_REGISTRY`.

    Examples
    --------
    >>> registry = NormRegistry.with_builtins()
    >>> registry.build("layer", 4)
    LayerNorm(4, eps=1e-05, affine=True)
    """

    def __init__(self, builders: Mapping[str, NormBuilder] | None = None) -> None:
        self._builders: dict[str, NormBuilder] = {}
        for name, builder in (builders or {}).items():
            self.register(name, builder)

    @classmethod
    def with_builtins(cls) -> NormRegistry:
        """A fresh registry holding the built-in layers of :data:`NORM_NAMES`."""
        return cls(_BUILTINS)

    def register(self, name: str, builder: NormBuilder, *, replace: bool = False) -> None:
        """Add ``builder`` under ``name``; an existing name needs ``replace=True``."""
        if not isinstance(name, str) or not name.isidentifier():
            msg = f"norm name must be an identifier-like str, got {name!r}"
            raise ConfigError(msg)
        if not callable(builder):
            msg = f"builder for norm {name!r} must be callable, got {builder!r}"
            raise ConfigError(msg)
        if name in self._builders and not check_bool("replace", replace):
            msg = f"norm {name!r} is already registered; pass replace=True to override it"
            raise ConfigError(msg)
        self._builders[name] = builder

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._builders)

    def _builder(self, name: str) -> NormBuilder:
        try:
            return self._builders[name]
        except (KeyError, TypeError):
            msg = f"unknown norm {name!r}; valid names: {', '.join(self._builders)}"
            raise ConfigError(msg) from None

    def _check_options(self, name: str, builder: NormBuilder, options: Mapping[str, Any]) -> None:
        accepted = _accepted_options(builder)
        if accepted is None:
            return
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            msg = (
                f"unknown option(s) {unknown!r} for norm {name!r}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
            raise ConfigError(msg)

    def build(self, name: str, num_features: int, **options: Any) -> StreamNorm:
        """Build layer ``name`` for ``num_features`` features with ``options``.

        Raises :class:`ConfigError` for an unknown name (listing the valid ones), an unknown
        option key (listing the accepted ones) or an invalid option value (quoting it).
        """
        builder = self._builder(name)
        check_num_features(num_features)
        self._check_options(name, builder, options)
        layer = builder(num_features, **options)
        if not isinstance(layer, StreamNorm):
            msg = f"builder for norm {name!r} returned {type(layer).__name__}, not a StreamNorm"
            raise ConfigError(msg)
        return layer

    def accepts_option(self, name: str, option: str) -> bool:
        """Whether layer ``name`` takes the keyword option ``option`` (a builder taking ``**``
        options is taken at its word: ``True``)."""
        accepted = _accepted_options(self._builder(name))
        return accepted is None or option in accepted

    def wants_weight_standardization(
        self, name: str, options: Mapping[str, Any] | None = None
    ) -> bool:
        """Whether the ``Linear`` before layer ``name`` should be a ``WeightStandardizedLinear``.

        The option ``weight_standardization`` decides when given (and accepted by the layer);
        otherwise the builder's class attribute ``wants_weight_standardization`` (``False`` if
        absent). Only ``"group"`` says ``True`` among the built-ins.
        """
        builder = self._builder(name)
        options = dict(options or {})
        self._check_options(name, builder, options)
        if "weight_standardization" in options:
            return check_bool("weight_standardization", options["weight_standardization"])
        return bool(getattr(builder, "wants_weight_standardization", False))


DEFAULT_REGISTRY = NormRegistry.with_builtins()
"""The process-wide registry used by :func:`build_norm` and :func:`register_norm`."""


def build_norm(name: str, num_features: int, **options: Any) -> StreamNorm:
    """Build a layer from :data:`DEFAULT_REGISTRY` (see :meth:`NormRegistry.build`)."""
    return DEFAULT_REGISTRY.build(name, num_features, **options)


def register_norm(name: str, builder: NormBuilder, *, replace: bool = False) -> None:
    """Register ``builder`` under ``name`` in :data:`DEFAULT_REGISTRY`."""
    DEFAULT_REGISTRY.register(name, builder, replace=replace)


def registered_norm_names() -> tuple[str, ...]:
    """Names in :data:`DEFAULT_REGISTRY`: :data:`NORM_NAMES` plus any registered later."""
    return DEFAULT_REGISTRY.names()


def norm_accepts_option(name: str, option: str) -> bool:
    """See :meth:`NormRegistry.accepts_option` (on :data:`DEFAULT_REGISTRY`)."""
    return DEFAULT_REGISTRY.accepts_option(name, option)


def norm_wants_weight_standardization(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """See :meth:`NormRegistry.wants_weight_standardization` (on :data:`DEFAULT_REGISTRY`)."""
    return DEFAULT_REGISTRY.wants_weight_standardization(name, options)
