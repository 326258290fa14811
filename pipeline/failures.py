"""Which failures a retry cannot change, told by the exception's type (never by its text).

Permanent: an image that cannot be opened or read (:class:`~pipeline.reading.ImageError`: not
found, not an image, an unsupported driver such as a disguised VRT, a regionOfInterest that
misses the image), a source or destination the allow-list refuses
(:class:`~pipeline.security.AccessDenied`) and an invalid request
(:class:`~pipeline.request.RequestError`). Everything else (throttling, network faults, lost
workers, tiles that failed at a model endpoint) is transient: the queue worker retries it a
bounded number of times.

:func:`one_line` is how every stage and graph words an exception for a user: one line.
"""

from __future__ import annotations

from pipeline.reading import ImageError
from pipeline.request import RequestError
from pipeline.security import AccessDenied

#: exception types whose failures are the same on every try
PERMANENT: tuple[type[BaseException], ...] = (ImageError, AccessDenied, RequestError)


def is_permanent(exc: BaseException) -> bool:
    """Whether a retry of what raised ``exc`` would fail the same way."""
    return isinstance(exc, PERMANENT)


def one_line(exc: BaseException) -> str:
    """``exc`` in one line: ``"<type>: <first line of its message>"`` (the type alone if the
    message is empty)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
