"""An OAUTHBEARER token provider for tests, named in settings as
``tests.kafka_token_provider:UnsecuredTokenProvider``.

It makes an unsigned JWT (``alg: none``), which a broker accepts only with Kafka's unsecured
validator (``OAuthBearerUnsecuredValidatorCallbackHandler``, the broker default for OAUTHBEARER):
a development setup, never production.
"""

from __future__ import annotations

import base64
import json
import time

from kafka.net.sasl.oauth import AbstractTokenProvider

__all__ = ["ExpiredTokenProvider", "NotAProvider", "UnsecuredTokenProvider"]

SUBJECT = "trainer"


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class UnsecuredTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """``token()``: an unsigned JWT for :data:`SUBJECT`, valid for an hour."""

    lifetime_s = 3600

    def token(self) -> str:
        expires = int(time.time()) + self.lifetime_s
        claims = {"sub": SUBJECT, "iat": expires - 3600, "exp": expires}
        return f"{_b64({'alg': 'none'})}.{_b64(claims)}."


class ExpiredTokenProvider(UnsecuredTokenProvider):
    """Tokens that expired a minute ago: the broker must refuse them."""

    lifetime_s = -60


def NotAProvider() -> object:
    """A callable that returns something else than a token provider."""
    return object()
