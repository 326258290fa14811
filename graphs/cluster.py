"""Getting a Dask client: a LocalCluster by default, or a running scheduler's address."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextmanager
def connect(cluster: str | None = "local", workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for ``cluster``: ``local`` (a LocalCluster of ``workers``
    single-threaded processes, on 127.0.0.1) or a scheduler address (``tcp://host:port``).

    A client that connected to a running cluster never shuts the cluster down.
    """
    from distributed import Client, LocalCluster

    if cluster in (None, "", "local"):
        n = workers or default_workers()
        with LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.WARNING,
        ) as local, Client(local) as client:
            log.info("LocalCluster with %d workers, dashboard %s", n, client.dashboard_link)
            yield client
        return
    with Client(cluster, timeout="20s") as client:
        log.info("connected to %s", cluster)
        yield client
