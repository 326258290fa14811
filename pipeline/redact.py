"""Keep secrets out of logs, status messages, summaries and exceptions.

:func:`redact` rewrites one string: AWS access key ids, ``key=value`` secrets (secret, token,
password, credential, signature, api key), ``Authorization``/``Bearer`` headers, passwords in
URLs (``scheme://user:pass@host``), the signing parameters of presigned URLs (``X-Amz-*``,
``Signature``, ``sig``, ``AWSAccessKeyId``, ...) and every value registered with
:func:`register_secret` (the process's ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` are
registered on import). :class:`RedactingFilter` applies it to every log record that a handler
emits, tracebacks included.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

MASK = "***"

#: secrets shorter than this are not registered (they would mask ordinary words)
MIN_SECRET_LENGTH = 8

_SENSITIVE_PARAM = (
    r"X-Amz-(?:Signature|Credential|Security-Token|SignedHeaders|Date|Expires|Algorithm)|"
    r"X-Goog-(?:Signature|Credential)|Signature|Sig|AWSAccessKeyId|Security-Token|"
    r"access_token|token|api_?key|apikey|key|secret|password|passwd|pwd|credential|auth|"
    r"client_secret"
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # presigned and token-bearing query parameters: keep the name, drop the value
    (re.compile(rf"([?&;](?:{_SENSITIVE_PARAM})=)[^&#\s\"'<>]*", re.IGNORECASE), rf"\g<1>{MASK}"),
    # URL user info: scheme://user:password@host
    (re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s:@\"']+:[^/\s@\"']*@", re.IGNORECASE), rf"\g<1>{MASK}@"),
    # Authorization headers (AWS SigV4, Basic, Bearer) up to the end of the line or quote
    (re.compile(r"(\bAuthorization\b[\"']?\s*[:=]\s*[\"']?)[^\"'\r\n]+", re.IGNORECASE), rf"\g<1>{MASK}"),
    (re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), rf"\g<1>{MASK}"),
    # key = value / "key": "value" secrets (AWS CLI, boto, JSON, env files)
    (
        re.compile(
            r"((?:aws_)?(?:secret(?:_?access)?_?key|session_?token|security_?token|secret|password|"
            r"passwd|api_?key|access_?token|client_?secret|credentials?|token|signature)[\"']?\s*[:=]\s*[\"']?)"
            r"[^\s\"',;&}]+",
            re.IGNORECASE,
        ),
        rf"\g<1>{MASK}",
    ),
    # AWS access key ids (long-term AKIA..., temporary ASIA...)
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}\b"), MASK),
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secret_pattern: re.Pattern[str] | None = None


def register_secret(value: str | None) -> None:
    """Mask every later occurrence of ``value`` (credentials learnt at run time)."""
    global _secret_pattern
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value in _secrets:
            return
        _secrets.add(value)
        ordered = sorted(_secrets, key=len, reverse=True)
        _secret_pattern = re.compile("|".join(re.escape(s) for s in ordered))


def register_environment_secrets(environ: Any = None) -> None:
    """Register the secret AWS values of ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        register_secret(environ.get(name))


def redact(text: str) -> str:
    """``text`` with every secret this module knows how to find replaced by ``***``."""
    if not text:
        return text
    register_environment_secrets()
    pattern = _secret_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    for regex, replacement in _PATTERNS:
        text = regex.sub(replacement, text)
    return text


def redact_obj(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every string redacted.

    Values under keys that name a secret (``secretAccessKey``, ``sessionToken``, ...) are
    masked whole.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            k: (MASK if isinstance(k, str) and _SECRET_KEY.search(k) and v else redact_obj(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_obj(v) for v in value)
    return value


_SECRET_KEY = re.compile(r"secret|session_?token|security_?token|password|credentials?$", re.IGNORECASE)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts the message (arguments merged) and any traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not lose the record
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_filter(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add one :class:`RedactingFilter` to every handler of ``logger`` (default: root)."""
    logger = logger or logging.getLogger()
    existing = next(
        (f for h in logger.handlers for f in h.filters if isinstance(f, RedactingFilter)), None
    )
    flt = existing or RedactingFilter()
    for handler in logger.handlers:
        if flt not in handler.filters:
            handler.addFilter(flt)
    return flt


register_environment_secrets()
