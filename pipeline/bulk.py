"""Building many small Python objects at once (feature properties, JSON text)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many lists and dicts that hold no
    cycles: every burst of allocations otherwise triggers collections that scan all the
    objects made so far (half the time of making 26,000 features' properties, and a third of
    writing them as GeoJSON). The collector's state is restored on exit."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
