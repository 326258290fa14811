"""The OSML-compatible queue worker: SQS ``ImageRequest`` messages in, jobs on a Dask cluster,
status on SNS.

At least once, done right:

- a received message stays hidden while its job runs (a heartbeat extends its visibility);
- it is deleted only after the job's outputs are complete (``SUCCESS`` or ``PARTIAL``);
- a redelivered message whose ``<jobId>.summary.json`` already says ``SUCCESS`` at an output
  location is acknowledged without redoing the work;
- a job that fails publishes one ``FAILED`` whose message is its one-line reason; a permanent
  failure (:mod:`pipeline.failures`: an image that cannot be opened, a region of interest that
  misses it, ...) is then moved at once to the dead-letter queue (deleted if there is none); a
  transient one is hidden for ``retry_delay`` and run again, up to ``max_attempts`` runs (at most
  the redrive policy's ``maxReceiveCount``), each retry announced as ``IN_PROGRESS``;
- a poison message (not JSON, an invalid request, an unknown model or output type) is published
  as ``FAILED`` and moved at once to the queue's dead-letter queue (deleted if there is none);
- ``SIGTERM``/``SIGINT`` stop taking messages; the current job finishes within
  ``grace_seconds`` or is released (visibility 0) for another worker.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import events as ev
from pipeline.failures import one_line
from pipeline.notify import StatusPublisher
from pipeline.redact import redact
from pipeline.request import ImageRequest, RequestError
from pipeline.security import AccessDenied, AllowList
from pipeline.tiling import VARIABLE_OVERLAP

log = logging.getLogger(__name__)
#: the tiling of a request that names no ``tilingStrategy``: OSML 2.x's
QUEUE_TILING = VARIABLE_OVERLAP


class JobCancelled(Exception):
    """Raised inside a running job when the worker gives its message back."""


@dataclass
class WorkerConfig:
    """How the worker polls, heartbeats and reports."""

    queue_url: str
    status_topic_arn: str | None = None
    max_jobs: int | None = None
    exit_when_idle: bool = False
    #: SQS long-poll wait (at most 20 s); also how long a stop may wait for the poll to return
    wait_seconds: int = 20
    #: how long a received message stays hidden, renewed by the heartbeat while its job runs
    visibility_timeout: int = 120
    #: seconds between heartbeats (default: a third of ``visibility_timeout``)
    heartbeat_seconds: float | None = None
    #: a failed job is hidden this long before its retry
    retry_delay: int = 10
    #: runs of a message whose job fails transiently (throttling, network, lost workers) before
    #: it is FAILED and dead-lettered; a permanent failure (pipeline.failures) gets one run
    max_attempts: int = 3
    #: on SIGTERM, how long the current job may take to finish before it is released
    grace_seconds: float = 0.0
    #: at most one IN_PROGRESS status per this many seconds
    progress_seconds: float = 30.0
    #: chunk side in pixels for ``run_job`` (None: its default)
    chunk_target: int | None = None

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_seconds or max(1.0, self.visibility_timeout / 3)


@dataclass
class WorkerStats:
    """What the worker did, by outcome."""

    received: int = 0
    succeeded: int = 0
    partial: int = 0
    failed: int = 0
    poison: int = 0
    duplicates: int = 0
    released: int = 0
    job_ids: list[str] = field(default_factory=list)


def read_ids(body: str) -> tuple[str, str]:
    """The ``jobId`` and first image URL of a message body, where they can be read ('')."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return "", ""
    if not isinstance(data, dict):
        return "", ""
    job_id, urls = data.get("jobId"), data.get("imageUrls")
    url = urls[0] if isinstance(urls, list) and urls else None
    return (job_id if isinstance(job_id, str) else "", url if isinstance(url, str) else "")


def s3_key(prefix: str, name: str) -> str:
    """``prefix`` and ``name`` joined with one ``/`` (no leading ``/`` when there is no prefix)."""
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def finished_summary(request: ImageRequest) -> dict[str, Any] | None:
    """The ``SUCCESS`` summary of this job at one of its output locations, or (a Kinesis-only
    job) at its done marker under ``MODEL_RUNNER_WORK_PREFIX``, if there is one."""
    from graphs.image_job import done_marker

    name = f"{request.job_id}.summary.json"
    marker = done_marker(request)
    for output in [*request.all_outputs, *([marker] if marker else [])]:
        text: str | bytes | None = None
        try:
            if output.type == "LOCAL":
                path = Path(output.path) / name
                text = path.read_text() if path.is_file() else None
            elif output.type == "S3":
                from pipeline.aws import client

                s3 = client("s3", output.role)
                try:
                    answer = s3.get_object(Bucket=output.bucket, Key=s3_key(output.prefix, name))
                except s3.exceptions.NoSuchKey:
                    continue
                text = answer["Body"].read()
        except Exception as exc:  # noqa: BLE001 - cannot tell: run the job again
            log.warning("cannot check %s for %s: %s", output.type, name, one_line(exc))
            continue
        if text is None:
            continue
        try:
            summary = json.loads(text)
        except ValueError:
            continue
        if isinstance(summary, dict) and summary.get("status") == ev.SUCCESS:
            return summary
    return None


class _Progress:
    """A progress "bar" for ``run_job`` that emits IN_PROGRESS and obeys cancellation."""

    def __init__(self, total: int, bus: ev.EventBus, job_id: str, every: float,
                 cancelled: threading.Event):
        self.total, self.done = total, 0
        self.bus, self.job_id, self.every, self.cancelled = bus, job_id, every, cancelled
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(self.job_id)
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            fraction = self.done / max(1, self.total)
            self.bus.emit(ev.IN_PROGRESS, self.job_id, message=f"{self.done}/{self.total} tiles",
                          progress=round(fraction, 4), tilesDone=self.done, tilesTotal=self.total)

    def close(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(self.job_id)


class QueueWorker:
    """Long-polls one SQS queue and runs each ``ImageRequest`` on a Dask client."""

    def __init__(self, config: WorkerConfig, client: Any, *, sqs: Any = None,
                 publisher: StatusPublisher | None = None, allow: AllowList | None = None):
        from pipeline import aws

        self.config = config
        self.client = client
        self.sqs = sqs or aws.client("sqs")
        self.publisher = publisher or StatusPublisher(
            config.status_topic_arn, aws.client("sns") if config.status_topic_arn else None
        )
        self.stats = WorkerStats()
        #: image sources and output destinations a request may name (pipeline.security)
        self.allow = allow if allow is not None else AllowList.for_worker()
        self.allow.check_work_prefix()  # where Kinesis-only jobs resume from: allowed, or refused now
        self.stopping = threading.Event()
        #: the last FAILED run's (reason, permanent, its JobStatus), see :meth:`_run`
        self._failure: tuple[str, bool, Any] = ("", False, None)
        self.dead_letter_url, self.max_receives = self._redrive()

    # ------------------------------------------------------------------ queue plumbing
    def _redrive(self) -> tuple[str | None, int | None]:
        """The dead-letter queue URL and ``maxReceiveCount`` of the queue's redrive policy."""
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.config.queue_url, AttributeNames=["RedrivePolicy"]
        ).get("Attributes", {})
        if "RedrivePolicy" not in attributes:
            log.info("queue has no redrive policy: poison messages are deleted")
            return None, None
        policy = json.loads(attributes["RedrivePolicy"])
        arn = str(policy["deadLetterTargetArn"])
        _, _, _, _, account, name = arn.split(":", 5)
        url = self.sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
        return str(url), int(policy.get("maxReceiveCount", 0)) or None

    def _delete(self, message: dict[str, Any]) -> None:
        self.sqs.delete_message(QueueUrl=self.config.queue_url,
                                ReceiptHandle=message["ReceiptHandle"])

    def _hide(self, message: dict[str, Any], seconds: int) -> None:
        try:
            self.sqs.change_message_visibility(QueueUrl=self.config.queue_url,
                                               ReceiptHandle=message["ReceiptHandle"],
                                               VisibilityTimeout=seconds)
        except Exception as exc:  # noqa: BLE001 - the message comes back on its own anyway
            log.warning("cannot change the visibility of message %s: %s",
                        message.get("MessageId"), one_line(exc))

    def _dead_letter(self, message: dict[str, Any], reason: str) -> None:
        """Move ``message`` to the dead-letter queue now (or delete it if there is none)."""
        reason = redact(reason)
        if self.dead_letter_url:
            attributes = dict(message.get("MessageAttributes") or {})
            attributes["failure_reason"] = {"DataType": "String", "StringValue": reason[:1000]}
            self.sqs.send_message(QueueUrl=self.dead_letter_url, MessageBody=message["Body"],
                                  MessageAttributes=attributes)
            log.warning("moved message %s to %s: %s", message.get("MessageId"),
                        self.dead_letter_url, reason)
        else:
            log.warning("deleted poison message %s: %s", message.get("MessageId"), reason)
        self._delete(message)

    # ------------------------------------------------------------------ the loop
    def stop(self, signum: int | None = None, _frame: Any = None) -> None:
        """Stop taking messages (a signal handler)."""
        if signum is not None:
            log.info("received %s: stopping after the current message",
                     signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> WorkerStats:
        """Poll until stopped, idle (``exit_when_idle``) or ``max_jobs`` messages are handled."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self.stop)
        try:
            return self._loop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _loop(self) -> WorkerStats:
        log.info("polling %s; allow-list: %s", self.config.queue_url, self.allow.describe())
        while not self.stopping.is_set():
            if self.config.max_jobs is not None and self.stats.received >= self.config.max_jobs:
                break
            answer = self.sqs.receive_message(
                QueueUrl=self.config.queue_url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=min(20, max(0, self.config.wait_seconds)),
                VisibilityTimeout=self.config.visibility_timeout,
                AttributeNames=["ApproximateReceiveCount"],
                MessageAttributeNames=["All"],
            )
            messages = answer.get("Messages", [])
            if not messages:
                if self.config.exit_when_idle:
                    break
                continue
            for message in messages:
                if self.stopping.is_set():
                    self._hide(message, 0)
                    self.stats.released += 1
                    continue
                self.stats.received += 1
                self.handle(message)
        log.info("worker stopped: %s", self.stats)
        return self.stats

    # ------------------------------------------------------------------ one message
    def _give_up(self, message: dict[str, Any], job_id: str, image_url: str, reason: str,
                 **status: Any) -> None:
        """Publish the message's one FAILED status (with ``reason``), then dead-letter it."""
        self.publisher.publish(ev.FAILED, job_id, image_url, reason, **status)
        self._dead_letter(message, reason)

    def _poison(self, message: dict[str, Any], reason: str) -> None:
        self.stats.poison += 1
        self._give_up(message, *read_ids(message["Body"]), reason)

    def _parse(self, message: dict[str, Any]) -> ImageRequest | None:
        """The request, or None after handling a poison message."""
        try:
            request, unknown = ImageRequest.from_message(message["Body"])
        except RequestError as exc:
            self._poison(message, str(exc))
            return None
        if unknown:
            log.info("job %s: accepted with unknown fields %s", request.job_id, ", ".join(unknown))
        if not request.all_outputs:
            self._poison(message, "invalid request: outputs: the request has no outputs")
            return None
        if request.tiling_strategy is None:  # an unchanged OSML request gets OSML's grid
            request = request.model_copy(update={"tiling_strategy": QUEUE_TILING})
        from pipeline.stac import StacError, expand_request

        try:
            request = expand_request(request, self.allow)  # STAC documents are checked as read
            self.allow.check_request(request)  # and every image href they gave, here
            self.allow.check_request_redirects(request)  # GDAL would follow them unchecked
        except AccessDenied as exc:
            self._poison(message, f"refused: {exc}")
            return None
        except StacError as exc:
            self._poison(message, f"invalid request: {exc}")
            return None
        return request

    def _sinks(self, message: dict[str, Any], request: ImageRequest) -> list[Any] | None:
        """The request's sinks after checking its model, or None after a poison message."""
        from graphs.image_job import model_spec
        from pipeline.models import ModelError, check_model
        from pipeline.sinks import make_sink

        try:
            if request.segmentation is None:
                check_model(model_spec(request))
            else:  # a segmenter (the request's segmentation field): checked as one
                from graphs.segment_job import check_request

                check_request(request)
            # OSML's queue: features in OSML's form unless an output asks for another
            return [make_sink(output, form="OSML") for output in request.all_outputs]
        except (ModelError, ValueError) as exc:
            self._poison(message, f"invalid request: {exc}")
            return None

    def handle(self, message: dict[str, Any]) -> str:
        """Handle one message; returns the outcome (a status, ``POISON``, ``DUPLICATE``, ...)."""
        request = self._parse(message)
        if request is None:
            return "POISON"
        image_url = request.image_urls[0]
        receives = int(message.get("Attributes", {}).get("ApproximateReceiveCount", 1))
        done = finished_summary(request)
        if done is not None:
            self.stats.duplicates += 1
            self.publisher.publish(ev.SUCCESS, request.job_id, image_url,
                                   "already complete: acknowledged without running again",
                                   duration=float((done.get("seconds") or {}).get("total") or 0),
                                   features=done.get("features"))
            self._delete(message)
            return "DUPLICATE"
        sinks = self._sinks(message, request)
        if sinks is None:
            return "POISON"
        log.info("job %s: receive %d of message %s", request.job_id, receives,
                 message.get("MessageId"))
        self.stats.job_ids.append(request.job_id)
        outcome = self._run(message, request, sinks)
        if outcome in (ev.SUCCESS, ev.PARTIAL):
            self._delete(message)
            if outcome == ev.SUCCESS:
                self.stats.succeeded += 1
            else:
                self.stats.partial += 1
        elif outcome == "RELEASED":
            self._hide(message, 0)
            self.stats.released += 1
        else:
            self.stats.failed += 1
            self._failed(message, request, receives)
        return outcome

    @property
    def attempts(self) -> int:
        """Runs a message gets before a transient failure is final: ``max_attempts``, or the
        redrive policy's ``maxReceiveCount`` if that is lower."""
        return min(self.config.max_attempts, self.max_receives or self.config.max_attempts)

    def _failed(self, message: dict[str, Any], request: ImageRequest, receives: int) -> None:
        """After a FAILED run: retry a transient failure (hidden for ``retry_delay``) until
        :attr:`attempts` runs, else publish FAILED and dead-letter (or delete) the message."""
        reason, permanent, status = self._failure
        image_url = request.image_urls[0]
        if permanent or receives >= self.attempts:
            why = "cannot succeed on a retry" if permanent else f"failed {receives} times"
            log.warning("job %s: FAILED (%s): %s", request.job_id, why, reason)
            self._give_up(message, request.job_id, image_url, reason,
                          duration=status.duration, failed_tiles=status.failed_tiles)
            return
        log.warning("job %s: attempt %d of %d failed: %s; retried in %d s", request.job_id,
                    receives, self.attempts, reason, self.config.retry_delay)
        self.publisher.publish(ev.IN_PROGRESS, request.job_id, image_url,
                               f"attempt {receives} of {self.attempts} failed, retrying: {reason}",
                               duration=status.duration, failed_tiles=status.failed_tiles)
        self._hide(message, self.config.retry_delay)

    def _run(self, message: dict[str, Any], request: ImageRequest, sinks: list[Any]) -> str:
        """Run the job in a thread while this thread heartbeats and watches for a stop. A
        FAILED run leaves its reason, whether it is permanent and its status in ``_failure``
        (its FAILED status is published by :meth:`_failed`, once, when it is final)."""
        from graphs.image_job import run_job
        from pipeline.failures import is_permanent

        bus = ev.EventBus()
        status = self.publisher.for_job(request.job_id, request.image_urls[0])

        def publish(event: ev.Event) -> None:
            if not (event.status == ev.FAILED and event.image_url is None):
                status(event)  # the job's FAILED waits for _failed: final, or a retry

        bus.subscribe(publish)
        cancelled = threading.Event()
        finished = threading.Event()
        outcome: dict[str, Any] = {}
        kwargs: dict[str, Any] = {
            "progress": lambda total: _Progress(total, bus, request.job_id,
                                                self.config.progress_seconds, cancelled),
            "bus": bus,
            "sinks": sinks,
        }
        if self.config.chunk_target:
            kwargs["chunk_target"] = self.config.chunk_target
        kwargs["resume"] = True  # a message whose job crashed mid-way continues from its parts
        kwargs["collect_features"] = False  # the features stream from the parts to the outputs
        runner: Any = run_job
        if request.segmentation is not None:  # a segmentation job: its COG and polygons
            from graphs.segment_job import run_segmentation

            runner = run_segmentation

        def target() -> None:
            from pipeline.parts import ResumeError

            try:
                try:
                    result = runner(request, self.client, **kwargs)
                except ResumeError as exc:  # the parts of another request with this jobId
                    log.warning("job %s: %s; starting over", request.job_id, exc)
                    kwargs["resume"] = False
                    result = runner(request, self.client, **kwargs)
                outcome["status"] = result.status
                outcome["reason"] = result.summary.get("reason") or result.status
                outcome["permanent"] = result.permanent
            except JobCancelled:
                outcome["status"] = "RELEASED"
            except Exception as exc:  # noqa: BLE001 - reported as FAILED, retried if transient
                outcome.update(status=ev.FAILED, reason=one_line(exc), permanent=is_permanent(exc))
            finally:
                finished.set()

        thread = threading.Thread(target=target, name=f"job-{request.job_id}", daemon=True)
        thread.start()
        beat = time.monotonic()
        deadline: float | None = None
        while not finished.wait(0.2):
            now = time.monotonic()
            if now - beat >= self.config.heartbeat:
                self._hide(message, self.config.visibility_timeout)
                beat = now
            if self.stopping.is_set() and deadline is None:
                deadline = now + self.config.grace_seconds
            if deadline is not None and now >= deadline:
                cancelled.set()
                log.warning("job %s: released for another worker (stopping)", request.job_id)
                return "RELEASED"
        self._failure = (str(outcome.get("reason") or ""), bool(outcome.get("permanent")), status)
        return str(outcome["status"])


def run_worker(config: WorkerConfig, cluster: str | None = "local",
               workers: int | None = None) -> WorkerStats:
    """Connect to ``cluster`` and run a :class:`QueueWorker` until it stops."""
    from graphs.cluster import connect

    with connect(cluster, workers) as client:
        return QueueWorker(config, client).run()
