"""Cluster-side wiring of model targets: resolve and check before a job, metrics after it."""

from __future__ import annotations

import logging
from typing import Any

from pipeline.models import ModelError, ModelSpec
from pipeline.models.endpoint import resolve_model, with_options
from pipeline.models.gpu import missing_resources, model_resources

log = logging.getLogger(__name__)


def _reset_worker() -> None:
    from pipeline.models.retry import METRICS

    METRICS.reset()


def _finish_worker() -> dict[str, Any]:
    import sys

    from pipeline.models.retry import snapshot_metrics

    cleaned = 0
    if "pipeline.models.sm_async" in sys.modules:
        from pipeline.models.sm_async import cleanup_pending

        cleaned = cleanup_pending()
    return {"metrics": snapshot_metrics(reset=True), "cleaned": cleaned}


def worker_resources(client: Any) -> list[dict[str, float]]:
    """Each worker's declared resources, as the scheduler sees them."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return [dict(w.get("resources") or {}) for w in workers]


def prepare_model(client: Any, spec: ModelSpec) -> ModelSpec:
    """Resolve ``spec`` in the client (endpoint URLs, caps, credentials, resources), fail fast
    when no worker has the resources its model tasks need, and reset the workers' metrics."""
    spec = resolve_model(spec)
    resources = model_resources(spec)
    if resources:
        spec = with_options(spec, resources=resources)
        why = missing_resources(resources, worker_resources(client))
        if why:
            raise ModelError(why)
    client.run(_reset_worker)
    return spec


def finish_model(client: Any) -> dict[str, Any]:
    """The job's model metrics per operation (merged over workers); runs delayed cleanups."""
    from pipeline.models.retry import merge_snapshots

    answers = client.run(_finish_worker).values()
    cleaned = sum(a["cleaned"] for a in answers)
    if cleaned:
        log.info("deleted %d async inference objects", cleaned)
    return merge_snapshots([a["metrics"] for a in answers])
