"""Status events: one place that logs what happened and tells subscribers (SNS, notebooks)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.redact import public_url, redact

log = logging.getLogger("pipeline.events")

STARTED, IN_PROGRESS, SUCCESS, PARTIAL, FAILED = (
    "STARTED",
    "IN_PROGRESS",
    "SUCCESS",
    "PARTIAL",
    "FAILED",
)


@dataclass(frozen=True)
class Event:
    """A job or image status change."""

    status: str
    job_id: str
    image_url: str | None = None
    message: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


Subscriber = Callable[[Event], None]


class EventBus:
    """Logs every event and passes it to each subscriber; a failing subscriber is logged.

    A job's FAILED and PARTIAL are warnings, its other statuses information; an image's status
    is a debug line (its reason is in the job's, see ``graphs.image_job.job_reason``). Image
    URLs are logged in their :func:`~pipeline.redact.public_url` form.
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(subscriber)

    def emit(self, status: str, job_id: str, image_url: str | None = None, message: str = "",
             **fields: Any) -> Event:
        event = Event(status, job_id, image_url, message, fields)
        where = f" {public_url(image_url)}" if image_url else ""
        level = (logging.DEBUG if image_url and status != IN_PROGRESS
                 else logging.WARNING if status in (FAILED, PARTIAL) else logging.INFO)
        log.log(level, "%s %s%s %s", status, job_id, where, redact(message))
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception as exc:  # noqa: BLE001 - a subscriber must not break the job
                log.warning("status subscriber failed: %s", exc)
        return event
