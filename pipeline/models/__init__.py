"""Model targets. :func:`load_model` builds (once per process) the adapter for a spec.

Adapters are looked up by ``imageProcessor.type`` in :data:`ADAPTERS`, which maps a type to
``"module:function"``; the function takes a :class:`ModelSpec` and returns a
:class:`ModelAdapter`. Modules are imported only when their type is used.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable

from pipeline.models.base import ModelAdapter, ModelError, ModelSpec

ADAPTERS: dict[str, str] = {
    "BUILTIN": "pipeline.models.builtin:create",
    "PYTHON": "pipeline.models.python:create",
    "SM_ENDPOINT": "pipeline.models.sagemaker:create",
    "SM_ASYNC_ENDPOINT": "pipeline.models.sm_async:create",
    "HTTP_ENDPOINT": "pipeline.models.http:create",
    "TFSERVING_ENDPOINT": "pipeline.models.tfserving:create",
}

_cache: dict[str, ModelAdapter] = {}
_lock = threading.Lock()


def adapter_factory(type_name: str) -> Callable[[ModelSpec], ModelAdapter]:
    """The factory function registered for ``type_name``."""
    try:
        reference = ADAPTERS[type_name.upper()]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ModelError(f"unknown imageProcessor.type {type_name!r} (known: {known})") from None
    module_name, _, attribute = reference.partition(":")
    factory: Callable[[ModelSpec], ModelAdapter] = getattr(
        importlib.import_module(module_name), attribute
    )
    return factory


def check_model(spec: ModelSpec) -> None:
    """Fail early, in the client, for a spec that cannot work (unknown type or name).

    Calls the adapter module's ``validate(spec)`` where it has one; builds nothing heavy.
    """
    factory = adapter_factory(spec.type)
    validate = getattr(importlib.import_module(factory.__module__), "validate", None)
    if validate is not None:
        validate(spec)


def load_model(spec: ModelSpec) -> ModelAdapter:
    """The adapter for ``spec``, built once per process and reused across tasks."""
    with _lock:
        adapter = _cache.get(spec.key)
        if adapter is None:
            adapter = adapter_factory(spec.type)(spec)
            _cache[spec.key] = adapter
        return adapter


def clear_cache() -> None:
    """Close and forget every cached adapter (tests, worker shutdown)."""
    with _lock:
        for adapter in _cache.values():
            adapter.close()
        _cache.clear()


__all__ = ["ADAPTERS", "ModelAdapter", "ModelError", "ModelSpec", "check_model", "load_model", "clear_cache"]
