"""Retries, throttling and concurrency limits for endpoint targets, and their metrics.

* :class:`RetryPolicy`: exponential backoff with full jitter on transient faults (5xx,
  throttling, connection errors, timeouts), a per-tile retry limit.
* :class:`AIMDLimiter`: a process-local window that halves on throttling and grows back by one
  slot per window of successes, never above the cap.
* :class:`Slots`: the AIMD window plus, inside a Dask worker, a cluster-wide
  ``distributed.Semaphore`` per endpoint, so that the cap holds across every worker.
* :data:`METRICS`: per-operation counters and latencies in this process (OSML-style).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from pipeline.models.base import ModelError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CONCURRENCY = 8
PER_INSTANCE_CONCURRENCY = 2


class TransientError(ModelError):
    """A fault worth retrying (5xx, connection error, timeout)."""

    kind = "server"


class ThrottledError(TransientError):
    """The endpoint said slow down (HTTP 429, ``ThrottlingException``)."""

    kind = "throttle"


class TimeoutFault(TransientError):
    kind = "timeout"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one tile."""

    max_retries: int = 3
    base_delay: float = 0.1
    max_delay: float = 5.0
    timeout: float = 60.0

    @classmethod
    def from_parameters(cls, params: dict[str, Any]) -> RetryPolicy:
        """From ``imageProcessorParameters`` ``maxRetries``, ``retryBaseDelay``, ``timeout``."""
        try:
            return cls(
                max_retries=int(params.get("maxRetries", cls.max_retries)),
                base_delay=float(params.get("retryBaseDelay", cls.base_delay)),
                max_delay=float(params.get("retryMaxDelay", cls.max_delay)),
                timeout=float(params.get("timeout", cls.timeout)),
            )
        except (TypeError, ValueError):
            raise ModelError(
                "imageProcessorParameters maxRetries, retryBaseDelay, retryMaxDelay and timeout "
                "must be numbers"
            ) from None

    def delay(self, attempt: int) -> float:
        """Full-jitter backoff before retry ``attempt`` (0-based)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


# ---------------------------------------------------------------------------- metrics
class OperationMetrics:
    """Counters and latencies of one operation (for example ``SM_ENDPOINT:invoke``)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {"invocations": 0, "errors": 0, "throttles": 0, "retries": 0}
        self.latencies: list[float] = []

    def merge(self, other: dict[str, Any]) -> None:
        for key, value in other["counts"].items():
            self.counts[key] = self.counts.get(key, 0) + int(value)
        self.latencies.extend(other["latencies"])

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counts)
        if self.latencies:
            p50, p90, p99 = np.percentile(np.asarray(self.latencies), [50, 90, 99])
            out["latencyMs"] = {
                "p50": round(p50 * 1000, 2), "p90": round(p90 * 1000, 2), "p99": round(p99 * 1000, 2),
                "max": round(max(self.latencies) * 1000, 2),
            }
        return out


class MetricsRegistry:
    """Per-process metrics, keyed by operation; workers' snapshots are merged in the client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, OperationMetrics] = {}

    def count(self, operation: str, name: str, n: int = 1) -> None:
        with self._lock:
            ops = self._ops.setdefault(operation, OperationMetrics())
            ops.counts[name] = ops.counts.get(name, 0) + n

    def latency(self, operation: str, seconds: float) -> None:
        with self._lock:
            self._ops.setdefault(operation, OperationMetrics()).latencies.append(seconds)

    def snapshot(self, reset: bool = False) -> dict[str, dict[str, Any]]:
        """Raw counters and latencies (mergeable), optionally clearing them."""
        with self._lock:
            out = {
                k: {"counts": dict(v.counts), "latencies": list(v.latencies)} for k, v in self._ops.items()
            }
            if reset:
                self._ops.clear()
        return out

    def reset(self) -> None:
        self.snapshot(reset=True)


METRICS = MetricsRegistry()


def merge_snapshots(snapshots: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Summary metrics (counts and latency percentiles) from several processes' snapshots."""
    merged: dict[str, OperationMetrics] = {}
    for snapshot in snapshots:
        for operation, raw in snapshot.items():
            merged.setdefault(operation, OperationMetrics()).merge(raw)
    return {operation: m.as_dict() for operation, m in sorted(merged.items())}


def snapshot_metrics(reset: bool = True) -> dict[str, dict[str, Any]]:
    """This process's metrics (run on every worker with ``client.run``)."""
    return METRICS.snapshot(reset=reset)


# ---------------------------------------------------------------------------- limits
class AIMDLimiter:
    """At most ``limit`` calls in flight; ``limit`` halves on throttling, regrows additively."""

    def __init__(self, cap: int):
        self.cap = max(1, int(cap))
        self.limit = float(self.cap)
        self.in_flight = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self) -> None:
        with self._cond:
            while self.in_flight >= max(1, int(self.limit)):
                self._cond.wait()
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    def release(self, throttled: bool = False) -> None:
        with self._cond:
            self.in_flight -= 1
            if throttled:
                self.limit = max(1.0, self.limit / 2)
            else:
                self.limit = min(float(self.cap), self.limit + 1.0 / max(self.limit, 1.0))
            free = max(1, int(self.limit)) - self.in_flight
            if free > 0:  # wake only as many waiters as may start (not a herd per release)
                self._cond.notify(free)


class SlotAtSend:
    """A slot taken by botocore's ``before-send`` event, once the request is serialised and
    signed (about a millisecond of CPU per call that would otherwise hold the slot), and given
    back by :meth:`done` when the call ends; :meth:`throttled` reports throttling to the AIMD
    window. One per adapter; the slot of each thread is kept apart."""

    def __init__(self, slots: Slots):
        self.slots = slots
        self._held = threading.local()

    def register(self, client: Any, event: str) -> None:
        client.meta.events.register(event, self._take)

    def _take(self, **_: Any) -> None:  # None: botocore goes on and sends the request
        if getattr(self._held, "slot", None) is None:
            slot = self.slots.slot()
            self._held.flag = slot.__enter__()
            self._held.slot = slot

    def throttled(self) -> None:
        if getattr(self._held, "slot", None) is not None:
            self._held.flag[0] = True

    def done(self) -> None:
        slot, self._held.slot = getattr(self._held, "slot", None), None
        if slot is not None:
            slot.__exit__(None, None, None)


class Slots:
    """A concurrency slot per call: the local AIMD window, then a cluster-wide lease.

    Leases come from one ``distributed.Semaphore`` per endpoint. A call that ends while another
    thread of this process waits for a slot hands its lease on instead of releasing it, so that a
    busy worker does not pay two scheduler round trips per request (they cost about a tenth of
    an endpoint's throughput); an idle worker gives its leases back.
    """

    def __init__(self, name: str, cap: int):
        self.name = name
        self.cap = max(1, int(cap))
        self.local = AIMDLimiter(self.cap)
        self._cluster: Any = None
        self._looked = False
        self._lock = threading.Lock()
        self._waiting = 0  #: threads of this process waiting for a slot or about to take a lease
        self._spare = 0  #: leases held for them (never more than there are such threads)

    def _semaphore(self) -> Any:
        """``distributed.Semaphore`` shared by every worker of the cluster (None outside one)."""
        with self._lock:
            if not self._looked:
                self._looked = True
                try:
                    from distributed import Semaphore, get_worker

                    get_worker()
                    name = f"model-runner:{self.name}:{self.cap}"
                    self._cluster = Semaphore(max_leases=self.cap, name=name)
                except (ImportError, ValueError):
                    self._cluster = None
            return self._cluster

    def bind(self) -> None:
        """Look up the cluster semaphore from the task's thread (``get_worker`` needs it)."""
        self._semaphore()

    def _take(self, semaphore: Any) -> None:
        with self._lock:
            self._waiting -= 1
            if self._spare:
                self._spare -= 1
                return
        semaphore.acquire()

    def _give(self, semaphore: Any) -> None:
        with self._lock:
            if self._spare < self._waiting:
                self._spare += 1
                return
        semaphore.release()

    @contextmanager
    def slot(self) -> Iterator[list[bool]]:
        """Hold a slot; set ``flag[0] = True`` inside to report throttling to the AIMD window."""
        throttled = [False]
        semaphore = self._semaphore()
        if semaphore is not None:
            with self._lock:
                self._waiting += 1
        self.local.acquire()
        try:
            if semaphore is not None:
                self._take(semaphore)
            try:
                yield throttled
            finally:
                if semaphore is not None:
                    self._give(semaphore)
        finally:
            self.local.release(throttled[0])


def call_with_retries(
    call: Callable[[], T],
    policy: RetryPolicy,
    slots: Slots | None,
    operation: str,
) -> T:
    """Run ``call`` in a slot, retrying transient faults with backoff; record metrics.

    ``slots=None``: the call takes its slot itself (see :class:`SlotAtSend`).
    Re-raises the last error (one line) when the retries are spent or the fault is permanent.
    """
    attempt = 0
    while True:
        with slots.slot() if slots is not None else nullcontext([False]) as throttled:
            began = time.perf_counter()
            METRICS.count(operation, "invocations")
            try:
                result = call()
            except TransientError as exc:
                METRICS.count(operation, "errors")
                if isinstance(exc, ThrottledError):
                    METRICS.count(operation, "throttles")
                    throttled[0] = True
                error: TransientError | None = exc
            except ModelError:
                METRICS.count(operation, "errors")
                raise
            else:
                METRICS.latency(operation, time.perf_counter() - began)
                return result
        assert error is not None
        if attempt >= policy.max_retries:
            raise error
        METRICS.count(operation, "retries")
        time.sleep(policy.delay(attempt))
        attempt += 1
