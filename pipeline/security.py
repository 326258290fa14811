"""The closed door: which image sources and output destinations a request may name.

An :class:`AllowList` holds URL-prefix rules for sources (``imageUrls``) and for outputs:

* ``s3://bucket`` or ``s3://bucket/prefix`` (``*`` and ``?`` match within the bucket name),
* ``https://host[:port][/path]`` (``http://`` likewise; ``*`` within the host name),
* ``/local/root`` or ``file:///local/root`` (symlinks are resolved before the check),
* ``kinesis://stream`` (outputs only).

Anything not matched is refused with an :class:`AccessDenied` that names the field. Whatever
the rules, a source is refused if it is a GDAL virtual path or connection string
(``/vsicurl/``, ``/vsizip/``, ``vrt://``, ``GTIFF_DIR:``, inline ``<VRTDataset>``), carries
credentials (``https://user:pass@``), has ``..`` segments, or points a wildcard at a cloud
metadata address; ``/vsis3/b/k`` is read as ``s3://b/k`` and ``NITF_IM:<k>:<url>`` is checked
as ``<url>``. The worker's door is closed by default (:meth:`AllowList.for_worker`): without
``MODEL_RUNNER_ALLOWED_SOURCES``/``MODEL_RUNNER_ALLOWED_OUTPUTS`` it reads and writes S3 only
(IAM decides which buckets) and writes Kinesis streams; no local path, ``file://``, or HTTP
host is allowed unless listed.

GDAL's curl follows HTTP redirects and has no option to stop, so the worker first follows an
``http(s)://`` image's redirects itself (:meth:`AllowList.check_redirects`, one ranged GET per
hop) and refuses a request that an allowed host sends elsewhere (an open redirect).

GDAL itself is closed too: :func:`open_raster` opens only :data:`IMAGE_DRIVERS` (no VRT, WMS
or other formats that fetch other URLs), and :data:`GDAL_SAFE_OPTIONS` stop directory listing,
``.netrc`` credentials, VRT Python pixel functions and verbose curl logs (headers).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

#: raster drivers a job may open (COGs are read by GTiff; J2K NITF segments by JP2OpenJPEG)
IMAGE_DRIVERS: tuple[str, ...] = ("GTiff", "NITF", "JP2OpenJPEG", "JPEG", "PNG")

#: GDAL configuration that closes SSRF and credential-leak paths (set per read)
GDAL_SAFE_OPTIONS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing (sidecar probing)
    "GDAL_VRT_ENABLE_PYTHON": "NO",  # no Python pixel functions in VRTs
    "GDAL_HTTP_NETRC": "NO",  # no ~/.netrc credentials sent to any host
    "CPL_CURL_VERBOSE": "NO",  # no request headers (signatures) in logs
    "GDAL_HTTP_UNSAFESSL": "NO",
}

#: GDAL retries of transient HTTP faults (429, 5xx, resets) on ``/vsis3/`` and ``/vsicurl/``
#: reads; GDAL does not retry by default, so one S3 ``503 SlowDown`` would fail an image
GDAL_RETRY_OPTIONS: dict[str, str] = {
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "0.5",  # seconds, doubled after each retry
}

#: a model endpoint's response larger than this is refused (bytes)
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: detections kept from one tile; the rest are dropped and counted
MAX_DETECTIONS_PER_TILE = 10_000

#: HTTP redirects of one image URL followed (and checked) before GDAL opens it
MAX_REDIRECTS = 5

ENV_SOURCES = "MODEL_RUNNER_ALLOWED_SOURCES"
ENV_OUTPUTS = "MODEL_RUNNER_ALLOWED_OUTPUTS"
#: ``s3://bucket[/prefix]`` where Kinesis-only jobs keep their parts, manifest and done marker
ENV_WORK_PREFIX = "MODEL_RUNNER_WORK_PREFIX"
#: the worker's closed defaults (neither variable set): S3 in, S3/Kinesis out, nothing local or HTTP
DEFAULT_SOURCES = ("s3://*",)
DEFAULT_OUTPUTS = ("s3://*", "kinesis://*")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")
_NITF_SEGMENT = re.compile(r"^NITF_IM:(\d+):(.+)$", re.IGNORECASE)
_GDAL_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_]*:")  # NITF_IM:0:..., GTIFF_DIR:1:..., HDF5:...
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})
_SOURCE_SCHEMES = frozenset({"s3", "http", "https", "file"})
_OUTPUT_SCHEMES = frozenset({"s3", "file", "kinesis"})


class AccessDenied(ValueError):
    """A source or destination that the allow-list refuses; ``str()`` is one line."""


@dataclass(frozen=True)
class Rule:
    """One allow-list entry: a scheme, a host/bucket pattern and a path prefix."""

    scheme: str
    host: str
    path: str

    def matches(self, scheme: str, host: str, path: str) -> bool:
        if scheme != self.scheme:
            return False
        if self.host != host:
            if not fnmatch.fnmatchcase(host, self.host) or _is_metadata_host(host):
                return False
        return _within(path, self.path)

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.path
        return f"{self.scheme}://{self.host}{self.path}"


def _within(path: str, prefix: str) -> bool:
    """``path`` equals ``prefix`` or lies below it (whole path segments)."""
    prefix = prefix.rstrip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _is_metadata_host(host: str) -> bool:
    name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if name in _METADATA_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_link_local or address.is_unspecified or str(address) == "fd00:ec2::254"


def _local(path: str) -> str:
    return os.path.realpath(path)


def parse_rule(text: str) -> Rule:
    """An allow-list entry from its text (see the module docstring)."""
    text = text.strip()
    if not text:
        raise ValueError("empty allow-list entry")
    if text.startswith("/") or text.startswith("file://"):
        path = text[len("file://"):] if text.startswith("file://") else text
        return Rule("file", "", _local(path))
    parts = urlsplit(text)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"allow-list entry {text!r} is neither an absolute path nor scheme://host")
    path = posixpath.normpath(parts.path) if parts.path not in ("", "/") else ""
    return Rule(parts.scheme.lower(), parts.netloc.lower(), path.rstrip("/"))


def _split_env(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    return tuple(p for p in re.split(r"[,\s]+", value) if p)


@dataclass(frozen=True)
class AllowList:
    """Allowed image sources and output destinations (URL-prefix rules)."""

    sources: tuple[Rule, ...] = ()
    outputs: tuple[Rule, ...] = ()

    @classmethod
    def from_strings(cls, sources: Iterable[str] = (), outputs: Iterable[str] = ()) -> AllowList:
        return cls(tuple(parse_rule(s) for s in sources), tuple(parse_rule(s) for s in outputs))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AllowList:
        """Rules from ``MODEL_RUNNER_ALLOWED_SOURCES``/``_OUTPUTS`` (comma or space separated)."""
        environ = os.environ if environ is None else environ
        return cls.from_strings(
            _split_env(environ.get(ENV_SOURCES), DEFAULT_SOURCES),
            _split_env(environ.get(ENV_OUTPUTS), DEFAULT_OUTPUTS),
        )

    @classmethod
    def for_worker(cls, environ: Mapping[str, str] | None = None) -> AllowList:
        """The queue worker's allow-list: :meth:`from_env`, closed by default (S3 only; a
        variable that is not set keeps its default, so naming local roots in one does not open
        the other)."""
        environ = os.environ if environ is None else environ
        if ENV_SOURCES not in environ and ENV_OUTPUTS not in environ:
            logging.getLogger(__name__).info(
                "no allow-list configured (%s, %s): image sources %s, outputs %s only",
                ENV_SOURCES, ENV_OUTPUTS, ", ".join(DEFAULT_SOURCES), ", ".join(DEFAULT_OUTPUTS))
        return cls.from_env(environ)

    def check_work_prefix(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The worker's :func:`work_prefix`, which must be an allowed output destination (it
        holds the parts of Kinesis-only jobs); :class:`AccessDenied` otherwise."""
        prefix = work_prefix(environ)
        return self.check_output(prefix, ENV_WORK_PREFIX) if prefix is not None else None

    def describe(self) -> str:
        """One line: the rules in force (for the worker's start-up log)."""
        return (f"image sources {', '.join(map(str, self.sources)) or 'none'}; "
                f"outputs {', '.join(map(str, self.outputs)) or 'none'}")

    # ------------------------------------------------------------------ checks
    def check_source(self, url: str, field: str = "imageUrls") -> str:
        """The URL to read if ``url`` is an allowed image source; else :class:`AccessDenied`."""
        scheme, host, path, normalised = _parse_source(url, field)
        if not any(rule.matches(scheme, host, path) for rule in self.sources):
            raise AccessDenied(f"{field}: {_where(scheme, host, path)} is not on the allow-list "
                               f"of image sources")
        return normalised

    def check_output(self, url: str, field: str = "outputs") -> str:
        """``url`` if it is an allowed output destination; else :class:`AccessDenied`."""
        scheme, host, path = _parse_output(url, field)
        if not any(rule.matches(scheme, host, path) for rule in self.outputs):
            raise AccessDenied(f"{field}: {_where(scheme, host, path)} is not on the allow-list "
                               f"of output destinations")
        return url

    def check_request(self, request: Any) -> None:
        """Refuse (one :class:`AccessDenied`, naming the field) a request that reaches outside."""
        for i, url in enumerate(request.image_urls):
            self.check_source(url, f"imageUrls[{i}]")
        for i, output in enumerate(request.outputs):
            self.check_output(output_url(output), f"outputs[{i}]")
        elevation = getattr(request, "elevation", None)
        if elevation is not None and getattr(elevation, "dem", None):
            self.check_source(elevation.dem, "elevation.dem")
        if request.output_bucket:
            url = f"s3://{request.output_bucket}/{request.output_prefix or ''}"
            self.check_output(url, "outputBucket")

    def check_redirects(self, url: str, field: str = "imageUrls", timeout: float = 10.0) -> str:
        """Follow the HTTP redirects of an ``http(s)://`` image (at most :data:`MAX_REDIRECTS`)
        and check every target with :meth:`check_source`; :class:`AccessDenied` names the hop.

        One ``Range: bytes=0-0`` GET per hop, redirects not followed by ``requests``, no body
        read. Other URLs, and network errors (GDAL reports those when it reads), pass.
        """
        import requests


        current = url.split(":", 2)[2] if _NITF_SEGMENT.match(url) else url
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(current).scheme.lower() not in ("http", "https"):
                return url
            try:
                response = requests.get(current, headers={"Range": "bytes=0-0"}, stream=True,
                                        allow_redirects=False, timeout=timeout)
            except requests.RequestException:
                return url
            response.close()
            location = response.headers.get("Location")
            if not response.is_redirect or not location:
                return url
            current = self.check_redirect(current, location, field)
        raise AccessDenied(f"{field}: more than {MAX_REDIRECTS} redirects")

    def check_redirect(self, current: str, location: str, field: str = "imageUrls") -> str:
        """The absolute target of a redirect from ``current`` to ``location``, checked with
        :meth:`check_source`; :class:`AccessDenied` names the (redacted) target."""
        from pipeline.redact import redact

        target = urljoin(current, location)
        try:
            self.check_source(target, field)
        except AccessDenied as exc:
            raise AccessDenied(f"{field}: redirected to {redact(target)}, which is refused "
                               f"({str(exc).split(': ', 1)[-1]})") from None
        return target

    def check_request_redirects(self, request: Any) -> None:
        """:meth:`check_redirects` for every image URL of ``request`` (worker mode)."""
        for i, url in enumerate(request.image_urls):
            self.check_redirects(url, f"imageUrls[{i}]")

    def refused_sources(self, urls: Iterable[str]) -> dict[str, str]:
        """``{url: reason}`` for every refused image URL (to fail only those images)."""
        refused = {}
        for i, url in enumerate(urls):
            try:
                self.check_source(url, f"imageUrls[{i}]")
            except AccessDenied as exc:
                refused[url] = str(exc)
        return refused


def work_prefix(environ: Mapping[str, str] | None = None) -> str | None:
    """``MODEL_RUNNER_WORK_PREFIX`` (``s3://bucket[/prefix]``, without a trailing ``/``), or
    None when it is not set; anything else is refused with one line."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV_WORK_PREFIX, "").strip()
    if not value:
        return None
    scheme, _, _ = _parse_output(value, ENV_WORK_PREFIX)
    if scheme != "s3":
        raise AccessDenied(f"{ENV_WORK_PREFIX}: {value} is not an s3://bucket[/prefix] URL")
    return value.rstrip("/")


def output_url(output: Any) -> str:
    """The URL an output of a request writes to (``LOCAL`` → its path)."""
    kind = str(getattr(output, "type", "")).upper()
    if kind == "LOCAL":
        return str(output.path)
    if kind == "S3":
        return f"s3://{output.bucket}/{output.prefix}"
    if kind == "KINESIS":
        return f"kinesis://{output.stream}"
    return f"{kind.lower()}://{getattr(output, 'name', '')}"


def _where(scheme: str, host: str, path: str) -> str:
    if scheme == "file":
        return f"local path {path}"
    return f"{scheme}://{host}{path}"


def _check_text(url: str, field: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise AccessDenied(f"{field}: empty URL")
    if _CONTROL.search(url):
        raise AccessDenied(f"{field}: control characters in URL")
    if "<" in url or ">" in url:
        raise AccessDenied(f"{field}: inline XML (a VRT definition) is not an image URL")
    return url.strip()


def _segments_ok(path: str, field: str) -> None:
    if "\\" in path or any(part in (".", "..") for part in path.split("/")):
        raise AccessDenied(f"{field}: '.', '..' or '\\' in the path is not allowed")


def _parse_source(url: str, field: str) -> tuple[str, str, str, str]:
    """``(scheme, host, path, url to read)`` of an image source, or :class:`AccessDenied`."""
    url = _check_text(url, field)
    segment = _NITF_SEGMENT.match(url)
    if segment:  # one image segment of a multi-segment NITF: check the file it names
        scheme, host, path, inner = _parse_source(segment.group(2), field)
        return scheme, host, path, f"NITF_IM:{segment.group(1)}:{inner}"
    if url.startswith("/vsis3/"):
        url = "s3://" + url[len("/vsis3/"):]
    if "/vsi" in url.lower() or url.lower().startswith("vsi"):
        raise AccessDenied(f"{field}: GDAL virtual file systems (/vsicurl/, /vsizip/, ...) are not "
                           f"allowed; name the image as s3://bucket/key")
    if url.startswith("/"):
        path = _local(url)
        return "file", "", path, path
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme and not _GDAL_PREFIX.match(url):
        raise AccessDenied(f"{field}: {url!r} is neither an absolute path nor a URL")
    if scheme not in _SOURCE_SCHEMES:
        shown = scheme or url.split(":", 1)[0]
        raise AccessDenied(f"{field}: URL scheme {shown!r} is not allowed (use s3://, https:// or an "
                           f"absolute path)")
    if parts.username is not None or parts.password is not None:
        raise AccessDenied(f"{field}: credentials in the URL are not allowed")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise AccessDenied(f"{field}: file:// URLs must not name a host")
        path = _local(parts.path)
        return "file", "", path, path
    host = parts.netloc.lower()
    if not host:
        raise AccessDenied(f"{field}: {scheme}:// URL without a host")
    if parts.fragment:
        raise AccessDenied(f"{field}: '#' fragments are not allowed in image URLs")
    if scheme == "s3":
        if not _BUCKET.match(host):
            raise AccessDenied(f"{field}: {host!r} is not a valid S3 bucket name")
        if parts.query:
            raise AccessDenied(f"{field}: '?' is not allowed in s3:// URLs")
        key = parts.path.lstrip("/")
        if not key:
            raise AccessDenied(f"{field}: s3://{host} has no object key")
        _segments_ok(key, field)
        return scheme, host, "/" + key, url
    _segments_ok(parts.path, field)
    return scheme, host, parts.path or "/", url


def _parse_output(url: str, field: str) -> tuple[str, str, str]:
    url = _check_text(url, field)
    if url.lower().startswith(("/vsi", "vsi")):
        raise AccessDenied(f"{field}: GDAL virtual file systems are not output destinations")
    if url.startswith("/") or "://" not in url:
        if not url.startswith("/"):
            raise AccessDenied(f"{field}: local output path {url!r} must be absolute")
        return "file", "", _local(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _OUTPUT_SCHEMES:
        raise AccessDenied(f"{field}: output scheme {scheme!r} is not allowed")
    if scheme == "file":
        return "file", "", _local(parts.path)
    host = parts.netloc.lower()
    _segments_ok(parts.path, field)
    return scheme, host, parts.path.rstrip("/")


# ---------------------------------------------------------------------- GDAL side
def open_raster(path: str, drivers: Iterable[str] | None = None) -> Any:
    """Open ``path`` for reading with only :data:`IMAGE_DRIVERS` (a rasterio dataset).

    GDAL identifies the file with these drivers alone, so a VRT, WMS description or other
    format that would fetch further URLs is "not recognized" and nothing is fetched.
    """
    from rasterio.env import env_ctx_if_needed
    from rasterio.io import DatasetReader

    allowed = list(drivers or _drivers_from_env())
    with env_ctx_if_needed():
        return DatasetReader(path, driver=allowed)


def _drivers_from_env() -> tuple[str, ...]:
    value = os.environ.get("MODEL_RUNNER_IMAGE_DRIVERS")
    return _split_env(value, IMAGE_DRIVERS) if value else IMAGE_DRIVERS


# ---------------------------------------------------------------------- model responses
def read_capped(stream: Any, limit: int = MAX_RESPONSE_BYTES, what: str = "response") -> bytes:
    """Read at most ``limit`` bytes from a file-like ``stream``; more is a ``ValueError``."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} is larger than {limit} bytes; refused")
    return bytes(data)


def read_response(response: Any, limit: int = MAX_RESPONSE_BYTES, deadline: float | None = None,
                  what: str = "response") -> bytes:
    """The body of a streamed ``requests`` response (``stream=True``), at most ``limit`` bytes
    and within ``deadline`` seconds in all (a slow trickle cannot hold a tile forever).

    Raises ``ValueError`` (too large) or ``TimeoutError`` (too slow); the connection is closed.
    """
    import time

    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        response.close()
        raise ValueError(f"{what} is larger than {limit} bytes ({declared} declared); refused")
    stop = time.monotonic() + deadline if deadline else None
    parts, size = [], 0
    try:
        for part in response.iter_content(chunk_size=65536):
            size += len(part)
            if size > limit:
                raise ValueError(f"{what} is larger than {limit} bytes; refused")
            if stop is not None and time.monotonic() > stop:
                raise TimeoutError(f"{what} timed out: not complete after {deadline:g} s")
            parts.append(part)
    finally:
        response.close()
    return b"".join(parts)


def cap_detections(detections: Any, limit: int = MAX_DETECTIONS_PER_TILE) -> tuple[Any, int]:
    """The ``limit`` highest-scoring detections of one tile, and how many were dropped."""
    n = len(detections)
    if n <= limit:
        return detections, 0
    import numpy as np

    keep = np.argpartition(-detections.scores, limit - 1)[:limit]
    return detections.select(np.sort(keep)), n - limit


# ---------------------------------------------------------------------- image headers
#: an image whose header claims more pixels than this (per band) is refused before planning
MAX_IMAGE_PIXELS = int(os.environ.get("MODEL_RUNNER_MAX_IMAGE_PIXELS", 2**36))
#: or more bands than this
MAX_IMAGE_BANDS = 256


def image_size_problem(width: int, height: int, bands: int) -> str | None:
    """Why a header's dimensions are refused (absurd or hostile), or None."""
    if width * height > MAX_IMAGE_PIXELS:
        return (f"{width}x{height} pixels is more than the limit of {MAX_IMAGE_PIXELS} "
                f"(MODEL_RUNNER_MAX_IMAGE_PIXELS)")
    if bands > MAX_IMAGE_BANDS:
        return f"{bands} bands is more than the limit of {MAX_IMAGE_BANDS}"
    return None
