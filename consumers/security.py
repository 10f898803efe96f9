"""Connection security settings shared by every Kafka client we make (consumer, producer, admin).

The values are passed through to kafka-python unchanged. Secrets (``sasl_plain_password``,
``ssl_password``) never appear in ``repr``, in :meth:`KafkaSecurity.describe` or in error messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from stream_trainer.errors import ConfigError

__all__ = ["SECURITY_PROTOCOLS", "KafkaSecurity"]

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
        return out

    def describe(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs and ``--show-config``."""
        return {
            f.name: (
                "***" if f.name in _SECRETS and getattr(self, f.name) else getattr(self, f.name)
            )
            for f in fields(self)
        }
