"""Connection security settings shared by every Kafka client we make (consumer, producer, admin).

One configuration serves ``run`` (source, dead letters, predictions), ``record`` and ``replay``:
the ``[kafka]`` table of the TOML file, ``STREAM_TRAINER_KAFKA__<KEY>`` variables and
``--kafka-option KEY=VALUE``. The values are passed through to kafka-python unchanged, except
``sasl_oauth_token_provider``. Secrets (``sasl_plain_password``, ``ssl_password``) never appear in
``repr``, in :meth:`KafkaSecurity.describe` or in error messages.

OAUTHBEARER
-----------
kafka-python asks a token provider object for each token; a setting names it as
``"package.module:callable"``: a class or function that, called without arguments, returns a
:class:`kafka.net.sasl.oauth.AbstractTokenProvider` (its ``token()`` returns the bearer token; it
should cache and refresh the token itself). The name is checked when the settings are read (the
module imports, the attribute is callable); the callable is called once per client built, in the
process that builds it (the consumer's child process builds its own). ``sasl_mechanism =
"OAUTHBEARER"`` without a provider is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from stream_trainer.errors import ConfigError

__all__ = ["SECURITY_PROTOCOLS", "KafkaSecurity", "load_token_provider"]

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")
_SECRETS = frozenset({"sasl_plain_password", "ssl_password"})


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How clients authenticate and encrypt; the defaults are a plain local broker."""

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    ssl_check_hostname: bool = True
    ssl_crlfile: str | None = None
    ssl_ciphers: str | None = None
    sasl_kerberos_service_name: str = "kafka"
    sasl_kerberos_domain_name: str | None = None
    sasl_kerberos_name: str | None = None
    sasl_oauth_token_provider: str | None = None

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            msg = (
                f"security_protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                f"got {self.security_protocol!r}"
            )
            raise ConfigError(msg)
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and self.sasl_mechanism is None:
            msg = f"security_protocol={self.security_protocol!r} needs sasl_mechanism"
            raise ConfigError(msg)
        if not sasl and self.sasl_mechanism is not None:
            msg = (
                f"sasl_mechanism={self.sasl_mechanism!r} needs a SASL security_protocol, "
                f"got security_protocol={self.security_protocol!r}"
            )
            raise ConfigError(msg)
        if self.sasl_mechanism is not None and self.sasl_mechanism not in SASL_MECHANISMS:
            msg = (
                f"sasl_mechanism must be one of {', '.join(SASL_MECHANISMS)}, "
                f"got {self.sasl_mechanism!r}"
            )
            raise ConfigError(msg)
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
            not self.sasl_plain_username or self.sasl_plain_password is None
        ):
            msg = (
                f"sasl_mechanism={self.sasl_mechanism!r} needs sasl_plain_username and "
                f"sasl_plain_password (username={self.sasl_plain_username!r})"
            )
            raise ConfigError(msg)
        provider = self.sasl_oauth_token_provider
        if self.sasl_mechanism == "OAUTHBEARER" and not provider:
            msg = (
                "sasl_mechanism='OAUTHBEARER' needs sasl_oauth_token_provider, "
                "'package.module:callable' returning a kafka-python AbstractTokenProvider"
            )
            raise ConfigError(msg)
        if provider is not None:
            if self.sasl_mechanism != "OAUTHBEARER":
                msg = (
                    f"sasl_oauth_token_provider={provider!r} is for sasl_mechanism='OAUTHBEARER', "
                    f"got sasl_mechanism={self.sasl_mechanism!r}"
                )
                raise ConfigError(msg)
            _resolve(provider)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> KafkaSecurity:
        """Build from a dict (a config file section); unknown keys are a :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            msg = f"unknown Kafka security setting(s) {unknown}; known: {sorted(known)}"
            raise ConfigError(msg)
        return cls(**mapping)

    def client_configs(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python clients (secrets included: never log this)."""
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "security_protocol" and value is not None:
                out[f.name] = value
        if not self.security_protocol.endswith("SSL"):
            for name in [k for k in out if k.startswith("ssl_")]:
                del out[name]
        if self.sasl_mechanism != "GSSAPI":
            for name in [k for k in out if k.startswith("sasl_kerberos_")]:
                del out[name]
        if self.sasl_oauth_token_provider is not None:
            out["sasl_oauth_token_provider"] = load_token_provider(self.sasl_oauth_token_provider)
        return out

    def describe(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs and ``--show-config``."""
        return {
            f.name: (
                "***" if f.name in _SECRETS and getattr(self, f.name) else getattr(self, f.name)
            )
            for f in fields(self)
        }


def _resolve(spec: str) -> Callable[[], Any]:
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        msg = f"sasl_oauth_token_provider must look like 'package.module:callable', got {spec!r}"
        raise ConfigError(msg)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"sasl_oauth_token_provider {spec!r}: cannot import: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"sasl_oauth_token_provider {spec!r}: {module_name} has no {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"sasl_oauth_token_provider {spec!r} is not callable")
    return target


def load_token_provider(spec: str) -> Any:
    """The token provider that ``spec`` (``"package.module:callable"``) makes: the callable's
    result, which must be a kafka-python ``AbstractTokenProvider``."""
    from kafka.net.sasl.oauth import AbstractTokenProvider

    provider = _resolve(spec)()
    if not isinstance(provider, AbstractTokenProvider):
        msg = (
            f"sasl_oauth_token_provider {spec!r} returned a {type(provider).__name__}, "
            "not a kafka.net.sasl.oauth.AbstractTokenProvider"
        )
        raise ConfigError(msg)
    return provider
