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


def prepare(session: Any, url: str, data: Any, headers: dict[str, str]) -> Any:
    """A ready-to-send POST (built outside the concurrency slot, resent as is on retries)."""
    import requests

    return session.prepare_request(requests.Request("POST", url, data=data, headers=headers))


def post(session: Any, url: str, data: Any, headers: dict[str, str], timeout: float, what: str,
         settings: dict[str, Any] | None = None) -> bytes:
    """POST and classify failures (requests). The body is capped in size and in total time
    (``MAX_RESPONSE_BYTES``; ``timeout`` for the whole body, so a trickle cannot hold a tile).

    ``data`` may be a request from :func:`prepare`; ``settings`` are the session's proxies and
    TLS settings from the environment (looked up per call when not given)."""
    import requests

    from pipeline.models.results import MalformedResponse
    from pipeline.security import MAX_RESPONSE_BYTES, read_response

    request = data if isinstance(data, requests.PreparedRequest) else prepare(session, url, data, headers)
    if settings is None:
        settings = session.merge_environment_settings(url, {}, True, None, None)
    try:
        response = session.send(request, timeout=timeout, **{**settings, "stream": True})
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
        self.settings = self.session.merge_environment_settings(spec.name, {}, True, None, None)

    def prepare(self, payload: bytes) -> Any:
        return prepare(self.session, self.spec.name, payload, self.headers)

    def invoke(self, payload: Any) -> bytes:
        return post(self.session, self.spec.name, payload, self.headers, self.policy.timeout,
                    f"HTTP endpoint {self.spec.name}", self.settings)

    def close(self) -> None:
        super().close()
        self.session.close()


def validate(spec: ModelSpec) -> None:
    validate_url_target(spec)


def resolve(spec: ModelSpec) -> ModelSpec:
    return with_options(spec, maxConcurrency=concurrency_parameter(spec) or DEFAULT_CONCURRENCY)


def create(spec: ModelSpec) -> ModelAdapter:
    return HttpEndpoint(spec)
