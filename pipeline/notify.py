"""Status notifications on SNS in OSML Model Runner's form.

Each message body is JSON (``jobId``, ``imageUrl``, ``status``, ``processingDuration``,
``failedTiles``, ``message``; OSML's body is a line of text); the message attributes are
OSML 2.3's image ``StatusMessage`` attributes, all SNS ``String`` values: ``status``,
``image_status``, ``job_id``, ``image_id`` (``<jobId>:<imageUrl>``) and ``processing_duration``
(seconds since the job started, as a decimal number such as ``"0.734"``: OSML's client checks
``float(processing_duration) > 0``, which OSML's own whole seconds fail for a sub-second job).
As in OSML, an attribute without a value is left out (a poison message has no job that ran, so
no ``processing_duration``). OSML status consumers and SNS filter policies on those attributes
work unchanged.

Everything published or logged is redacted first (:mod:`pipeline.redact`): image URLs are
published in their :func:`~pipeline.redact.public_url` form (``imageUrl`` and ``image_id``), and
secrets in messages never reach the topic.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline import events as ev
from pipeline.redact import public_url, redact, redact_obj

log = logging.getLogger(__name__)

#: statuses that end a job
TERMINAL = (ev.SUCCESS, ev.PARTIAL, ev.FAILED)


def seconds_text(duration: float) -> str:
    """``processing_duration``: decimal seconds, at least ``"0.001"`` for a job that ran
    (``""``, left out, for one that did not)."""
    return f"{max(duration, 0.001):.3f}" if duration > 0 else ""


def status_attributes(status: str, job_id: str, image_url: str, duration: float) -> dict[str, str]:
    """OSML's image status message attributes as plain strings; empty ones are left out, as
    OSML's ``StatusMessage.asdict`` leaves out unset ones (SNS allows no empty values)."""
    attributes = {"status": status, "image_status": status, "job_id": job_id,
                  "image_id": f"{job_id}:{image_url}" if job_id and image_url else "",
                  "processing_duration": seconds_text(duration)}
    return {k: v for k, v in attributes.items() if v}


def status_body(status: str, job_id: str, image_url: str, duration: float, failed_tiles: int,
                message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of a status message."""
    return {
        "jobId": job_id,
        "imageUrl": image_url,
        "status": status,
        "processingDuration": round(duration, 3),
        "failedTiles": failed_tiles,
        "message": message,
        **extra,
    }


class StatusPublisher:
    """Publishes status messages to an SNS topic (or only logs them when there is none)."""

    def __init__(self, topic_arn: str | None, client: Any = None):
        self.topic_arn = topic_arn
        if topic_arn and client is None:
            import boto3

            client = boto3.client("sns")
        self._client = client

    def publish(self, status: str, job_id: str, image_url: str = "", message: str = "", *,
                duration: float = 0.0, failed_tiles: int = 0, **extra: Any) -> None:
        """Publish one status message (redacted); a failure to publish is logged, never raised."""
        job_id, image_url, message = redact(job_id), public_url(image_url), redact(message)
        body = redact_obj(status_body(status, job_id, image_url, duration, failed_tiles, message,
                                      **extra))
        log.info("status %s %s %s", status, job_id, message)
        if not self.topic_arn:
            return
        attributes = status_attributes(status, job_id, image_url, duration)  # parts redacted
        try:
            self._client.publish(
                TopicArn=self.topic_arn,
                Message=json.dumps(body),
                MessageAttributes={
                    k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()
                },
            )
        except Exception as exc:  # noqa: BLE001 - status must never break a job
            log.warning("cannot publish status to %s: %s", self.topic_arn,
                        redact(str(exc).strip().splitlines()[0]) if str(exc).strip()
                        else type(exc).__name__)

    def for_job(self, job_id: str, image_url: str) -> JobStatus:
        """A :class:`~pipeline.events.EventBus` subscriber for one job."""
        return JobStatus(self, job_id, image_url)


@dataclass
class JobStatus:
    """Subscriber that publishes a job's job-level events (with its duration so far).

    Per-image events are not published; their failed-tile counts add up into the final one.
    """

    publisher: StatusPublisher
    job_id: str
    image_url: str
    started: float = field(default_factory=time.monotonic)
    failed_tiles: int = 0
    final: str | None = None

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, event: ev.Event) -> None:
        if event.job_id != self.job_id:
            return
        if event.image_url is not None and event.status != ev.IN_PROGRESS:
            self.failed_tiles += int(event.fields.get("failedTiles", 0) or 0)
            return
        if event.status in TERMINAL:
            self.final = event.status
        extra = {k: v for k, v in event.fields.items() if k != "failedTiles"}
        self.publisher.publish(event.status, self.job_id, self.image_url, event.message,
                               duration=self.duration, failed_tiles=self.failed_tiles, **extra)
