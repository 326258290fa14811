"""Keep secrets out of logs, status messages, summaries, features and exceptions.

:func:`public_url` is the one form of an image URL that is ever written (features'
``image_url``, summaries, status messages, manifests, titles): its user info and its signing and
token query parameters (:data:`SECRET_PARAMS`, every ``X-Amz-*``/``X-Goog-*`` parameter, and an
Azure SAS token's fields) keep their names but lose their values (``***``); the rest of the URL
is kept byte for byte. The original URL is still what is read.

:func:`redact` rewrites one free text: every URL in it through :func:`public_url`, AWS
access key ids, ``key=value`` secrets (secret, token, password, credential, signature, api key;
a URL or path after the keyword is not taken for one), ``Authorization``/``Bearer`` headers,
the same query parameters outside a whole URL, and every value registered with
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
from urllib.parse import unquote_plus

MASK = "***"

#: secrets shorter than this are not registered (they would mask ordinary words)
MIN_SECRET_LENGTH = 8

#: query parameters whose values are secrets (or sign them), compared in lower case
SECRET_PARAMS = frozenset({
    "signature", "sig", "awsaccesskeyid", "googleaccessid", "security-token",
    "x-security-token", "token", "access_token", "id_token", "refresh_token", "session_token",
    "sessiontoken", "auth", "authorization", "api_key", "apikey", "api-key", "key", "secret",
    "client_secret", "password", "passwd", "pwd", "credential", "credentials", "policy",
    "key-pair-id",
})
#: query parameter prefixes of AWS SigV4 and Google V4 signed URLs (Credential, Signature,
#: Security-Token, SignedHeaders, Date, Expires, Algorithm, ...)
SECRET_PARAM_PREFIXES = ("x-amz-", "x-goog-")
#: the fields of an Azure SAS token, masked in a query that carries its ``sig``
SAS_PARAMS = frozenset({
    "sv", "ss", "srt", "sp", "se", "st", "spr", "sip", "sr", "si", "sdd", "skoid", "sktid", "skt",
    "ske", "sks", "skv", "saoid", "suoid", "scid",
})

_SENSITIVE_PARAM = (
    r"X-Amz-[A-Za-z-]+|X-Goog-[A-Za-z-]+|"
    + "|".join(re.escape(name) for name in sorted(SECRET_PARAMS, key=len, reverse=True))
)
#: a URL in free text (trailing punctuation is not part of it)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s\"'<>`]*[^\s\"'<>`.,;:!?)\]}]", re.IGNORECASE)
#: URL user info: ``scheme://user:password@`` or ``scheme://token@``
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/?#@\s\"']+@", re.IGNORECASE)
#: not followed by a URL or an absolute path: after a keyword such as ``passwd:`` that ends
#: another value (``<jobId>:<imageUrl>``), those are not the keyword's secret value
_NO_URL_AHEAD = r"(?![a-z][a-z0-9+.-]*://|/)"
#: a secret value after a keyword: one word, without the punctuation that ends a clause
_WORD = r"[^\s\"',;&}]*[^\s\"',;&}.:!?)\]]"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # presigned and token-bearing query parameters (outside a whole URL): keep the name only
    (re.compile(rf"([?&;](?:{_SENSITIVE_PARAM})=)(?:[^&#\s\"'<>]*[^&#\s\"'<>.,;:!?)\]}}])?",
                re.IGNORECASE), rf"\g<1>{MASK}"),
    # URL user info: scheme://user:password@host
    (_USERINFO, rf"\g<1>{MASK}@"),
    # Authorization headers (AWS SigV4, Basic, Bearer, ...) up to the end of the line or quote;
    # any other value after the keyword is one word
    (re.compile(r"(\bAuthorization\b[\"']?\s*[:=]\s*[\"']?)(?:(?:AWS4-HMAC-SHA256|AWS|Basic|"
                r"Bearer|Digest|Negotiate|NTLM|Token|OAuth)\s[^\"'\r\n]+|"
                rf"{_NO_URL_AHEAD}{_WORD})", re.IGNORECASE), rf"\g<1>{MASK}"),
    (re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), rf"\g<1>{MASK}"),
    # key = value / "key": "value" secrets (AWS CLI, boto, JSON, env files)
    (
        re.compile(
            r"((?:aws_)?(?:secret(?:_?access)?_?key|session_?token|security_?token|secret|password|"
            r"passwd|api_?key|access_?token|client_?secret|credentials?|token|signature)[\"']?\s*[:=]\s*[\"']?)"
            rf"{_NO_URL_AHEAD}{_WORD}",
            re.IGNORECASE,
        ),
        rf"\g<1>{MASK}",
    ),
    # AWS access key ids (long-term AKIA..., temporary ASIA...)
    (re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}\b"), MASK),
)


def _secret_param(name: str, sas: bool) -> bool:
    name = unquote_plus(name).strip().lower()
    return name in SECRET_PARAMS or name.startswith(SECRET_PARAM_PREFIXES) or (sas and name in SAS_PARAMS)


def _mask_query(query: str) -> str:
    """``query`` (``a=1&b=2``) with the values of its secret parameters masked."""
    pairs = [pair.partition("=") for pair in query.split("&")]
    sas = any(unquote_plus(name).strip().lower() == "sig" for name, _, _ in pairs)
    return "&".join(
        f"{name}={MASK}" if sep and value and _secret_param(name, sas) else f"{name}{sep}{value}"
        for name, sep, value in pairs
    )


def public_url(url: str) -> str:
    """``url`` as it may be written: user info and the values of signing and token query
    parameters masked (``https://***@h/a.tif?X-Amz-Signature=***&v=2``), the rest unchanged.

    Idempotent; a plain path or URL comes back as it is. Also masks a URL inside a GDAL path
    (``NITF_IM:0:https://...``, ``/vsicurl/https://...``).
    """
    if not url or ("@" not in url and "?" not in url):
        return url
    base, hash_, fragment = url.partition("#")
    base, mark, query = base.partition("?")
    base = _USERINFO.sub(rf"\g<1>{MASK}@", base)
    return f"{base}{mark}{_mask_query(query) if mark else ''}{hash_}{fragment}"


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
    text = _URL.sub(lambda match: public_url(match.group()), text)
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
    if isinstance(value, (list, tuple)):  # numbers (most of a summary) pass as they are
        return type(value)(v if v.__class__ in _PLAIN else redact_obj(v) for v in value)
    return value


_PLAIN = frozenset({int, float, bool, type(None)})


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
