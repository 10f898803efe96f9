"""Logging for the service: plain text, or one JSON object per line.

Whatever the format, a password in a URL (``redis://user:secret@host``) is masked in every line,
messages and tracebacks alike: settings are masked where they are described
(:meth:`~stream_trainer.service.config.ServiceConfig.describe`), and this is the net under that for
messages that quote a URL (a client's error text, for example). Python warnings are routed through
logging, so that with ``--log-format json`` every line on stderr is a JSON object.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import TextIO

__all__ = ["JsonLineFormatter", "RedactingFormatter", "configure_logging", "redact"]

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s/@]+@")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def redact(text: str) -> str:
    """Mask the password of every ``scheme://user:password@`` in ``text``.

    >>> redact("cannot reach redis://default:hunter2@redis:6379/0")
    'cannot reach redis://default:***@redis:6379/0'
    """
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


class RedactingFormatter(logging.Formatter):
    """The usual text format, URL passwords masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonLineFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "message": ...}`` per line (plus ``exception``
    with the traceback when there is one); URL passwords masked."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(data)


def configure_logging(fmt: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log record (and Python warnings) to ``stream`` (default: stderr) in ``fmt``
    (``"text"`` or ``"json"``), at ``level`` and above; kafka-python only from WARNING."""
    if fmt not in ("text", "json"):
        msg = f"log format must be 'text' or 'json', got {fmt!r}"
        raise ValueError(msg)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if fmt == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(RedactingFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # Off then on: re-installs the hook even when someone restored warnings.showwarning after an
    # earlier call (captureWarnings(True) alone is then a no-op, and warnings stop reaching us).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
