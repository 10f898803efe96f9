"""Keeping secrets out of logs and error messages."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["MASK", "mask_url"]

MASK = "***"
_MASK = MASK


def mask_url(url: str) -> str:
    """``url`` with the password of its user info masked (``redis://u:***@host:6379/0``).

    >>> mask_url("redis://default:hunter2@redis:6379/0?prefix=a")
    'redis://default:***@redis:6379/0?prefix=a'
    >>> mask_url("file://checkpoints")
    'file://checkpoints'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _MASK
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{_MASK}@{host}"))
