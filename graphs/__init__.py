"""Dask graphs assembled from the ``pipeline`` stages: image job, tile-list job, queue worker."""

from graphs.image_job import JobResult, image_job, run_job

__all__ = ["JobResult", "image_job", "run_job"]
