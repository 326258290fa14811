"""``HTTP_ENDPOINT``: ``POST`` the encoded tile to ``imageProcessor.name`` (a URL).

``imageProcessorParameters`` (minus the runner's keys) are sent as HTTP headers, as OSML does.
HTTP 429 is throttling; 5xx, connection errors and timeouts are retried; other 4xx fail the tile.
"""

from __future__ import annotations

from typing import Any

from pipeline.models.base import ModelAdapter, ModelError, ModelSpec
from pipeline.models.endpoint import (
    EndpointAdapter,
    concurrency_parameter,
    validate_url_target,
    with_options,
)
from pipeline.models.retry import DEFAULT_CONCURRENCY, ThrottledError, TimeoutFault, TransientError


def http_error(status: int, text: str, what: str) -> ModelError:
    detail = (text.strip().splitlines() or [""])[0][:200]
    message = f"{what}: HTTP {status}" + (f" ({detail})" if detail else "")
    if status == 429 or "ThrottlingException" in detail:
        return ThrottledError(message)
    if status >= 500:
        return TransientError(message)
    return ModelError(message)


def post(session: Any, url: str, data: Any, headers: dict[str, str], timeout: float, what: str) -> bytes:
    """POST and classify failures (requests). The body is capped in size and in total time
    (``MAX_RESPONSE_BYTES``; ``timeout`` for the whole body, so a trickle cannot hold a tile)."""
    import requests

    from pipeline.models.results import MalformedResponse
    from pipeline.security import MAX_RESPONSE_BYTES, read_response

    try:
        response = session.post(url, data=data, headers=headers, timeout=timeout, stream=True)
        if response.status_code >= 300:
            raise http_error(response.status_code, response.text[:2000], what)
        return read_response(response, MAX_RESPONSE_BYTES, deadline=timeout, what=what)
    except requests.Timeout:
        raise TimeoutFault(f"{what}: timed out after {timeout:g} s") from None
    except TimeoutError as exc:
        raise TimeoutFault(f"{what}: {exc}") from None
    except requests.RequestException as exc:
        raise TransientError(f"{what}: connection failed ({type(exc).__name__})") from None
    except ValueError as exc:  # read_response: the body is over the size cap
        raise MalformedResponse(f"malformed response: {exc}") from None


def session_for(pool: int) -> Any:
    import requests

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=max(10, pool), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class HttpEndpoint(EndpointAdapter):
    operation = "HTTP_ENDPOINT:invoke"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.headers = {k: str(v) for k, v in spec.model_parameters.items()}
        self.headers.setdefault("Content-Type", self.content_type)
        self.session = session_for(self.cap)

    def invoke(self, payload: bytes) -> bytes:
        return post(self.session, self.spec.name, payload, self.headers, self.policy.timeout,
                    f"HTTP endpoint {self.spec.name}")

    def close(self) -> None:
        super().close()
        self.session.close()


def validate(spec: ModelSpec) -> None:
    validate_url_target(spec)


def resolve(spec: ModelSpec) -> ModelSpec:
    return with_options(spec, maxConcurrency=concurrency_parameter(spec) or DEFAULT_CONCURRENCY)


def create(spec: ModelSpec) -> ModelAdapter:
    return HttpEndpoint(spec)
