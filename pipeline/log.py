"""Structured logs: one line per event, ``key=value`` (logfmt) or JSON, secrets redacted."""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from .settings import Secret

__all__ = ["EventLogger", "configure_logging", "error_text", "get_logger", "redact",
           "register_secret", "scrub"]

_SECRET_KEY = re.compile(r"pass(word)?|secret|token|credential|api_?key|private|authorization",
                         re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")
_PLAIN = re.compile(r"^[A-Za-z0-9_.:/@+-]+$")

ROOT = "gaitflow"

# values of every Secret loaded from settings: scrubbed from any output line, so a
# password echoed inside a driver's exception message never reaches the log
_KNOWN_SECRETS: set[str] = set()


def error_text(exc: BaseException) -> str:
    """``"Type: message"``, or just ``"Type"`` when the message is empty (a bare
    ``TimeoutError()``), for logs, reasons and dead letters."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def register_secret(value: str | Secret | None) -> None:
    text = value.get() if isinstance(value, Secret) else value
    if text and len(text) >= 4:
        _KNOWN_SECRETS.add(text)


def scrub(text: str) -> str:
    """Replace every known secret value inside ``text`` with ``***``."""
    for secret in _KNOWN_SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def redact(key: str, value: Any) -> Any:
    """Hide secret values: Secret objects, secret-looking keys, credentials inside URLs."""
    if isinstance(value, Secret):
        return "***"
    if _SECRET_KEY.search(key) and value not in (None, "", False):
        return "***"
    if isinstance(value, str) and "://" in value:
        return _URL_CREDENTIALS.sub(r"\g<scheme>***:***@", value)
    return value


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, "fields", {}) or {})
        event = getattr(record, "event", None) or record.getMessage()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp += f".{int(record.msecs):03d}Z"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields.setdefault("error", error_text(exc))
        fields = {k: redact(k, v) for k, v in fields.items()}
        if self.json:
            doc = {"ts": stamp, "level": record.levelname.lower(), "logger": record.name,
                   "event": event, **fields}
            return scrub(json.dumps(doc, default=str, ensure_ascii=False))
        parts = [stamp, record.levelname.lower(), f"event={_fmt(event)}"]
        parts += [f"{k}={_fmt(v)}" for k, v in fields.items()]
        return scrub(" ".join(parts))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        value = round(value, 6)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if text and _PLAIN.match(text) else json.dumps(text, ensure_ascii=False)


class EventLogger:
    """``log.info("handler.started", handler="mqtt", elapsed_ms=12)`` → one line."""

    __slots__ = ("_bound", "_logger")

    def __init__(self, name: str = ROOT, **bound: Any) -> None:
        self._logger = logging.getLogger(name)
        self._bound = bound

    def bind(self, **fields: Any) -> EventLogger:
        return EventLogger(self._logger.name, **{**self._bound, **fields})

    def _log(self, level: int, event: str, exc_info: Any, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, exc_info=exc_info,
                             extra={"event": event, "fields": {**self._bound, **fields}})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, None, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, None, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, None, fields)

    def error(self, event: str, exc_info: Any = None, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info, fields)


def get_logger(**bound: Any) -> EventLogger:
    return EventLogger(ROOT, **bound)


def configure_logging(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Route the ``gaitflow`` loggers to ``stream`` (stderr) with the chosen format."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        if getattr(handler, "_gaitflow", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    handler._gaitflow = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
