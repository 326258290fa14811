"""AWS conventions for boto3 and GDAL alike: credentials, region, endpoints, assumed roles.

Users configure AWS the usual way (the default boto3 chain: env vars, profiles, instance and
task roles; ``AWS_REGION``; ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_<SERVICE>``).

Credentials are resolved where they are used and never travel: every process that calls AWS
(the client for planning reads and outputs, each Dask worker for chunk reads and model calls)
gets them itself through :func:`session`, from its own default chain or, for a role
(``imageReadRole``, ``imageProcessor.assumedRole``), from an STS assumed-role provider cached
per (role, process) that renews the session :func:`refresh_margin` seconds before it expires.
Tasks carry only non-secret settings: endpoint URLs, region and role ARN
(:func:`gdal_s3_options` for GDAL reads). A request that AWS still rejects as expired is retried
once with renewed credentials (:func:`renew`, :func:`is_expired_code`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: option names whose values are secret (never logged, never in a summary)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: read option (not a GDAL option) that makes a read sign its ``/vsis3/`` requests with the
#: reading process's credentials: ``default`` (its boto3 chain) or the role ARN it assumes
SIGNER_OPTION = "MODEL_RUNNER_S3_SIGNER"
#: read option (not a GDAL option): the STS endpoint that reading process assumes a role at
STS_OPTION = "MODEL_RUNNER_AWS_STS_ENDPOINT"
#: seconds before expiry at which an assumed role's session is renewed (botocore's advisory
#: window); tests set it close to the session's lifetime to renew every few seconds
REFRESH_MARGIN_ENV = "MODEL_RUNNER_AWS_REFRESH_MARGIN"
DEFAULT_REFRESH_MARGIN = 15 * 60.0
#: error codes with which AWS rejects expired credentials
EXPIRED_CODES = frozenset({"ExpiredToken", "ExpiredTokenException", "RequestExpired",
                           "TokenRefreshRequired", "InvalidToken"})


class AwsError(RuntimeError):
    """An AWS setting or call that failed; ``str()`` is one line without secrets."""


class GdalOptions(dict[str, str]):
    """GDAL config options for one image's reads; ``repr`` hides any secret value."""

    def __repr__(self) -> str:
        shown = {k: ("***" if k in SECRET_KEYS else v) for k, v in self.items()}
        return f"GdalOptions({shown!r})"

    __str__ = __repr__


def endpoint_url(service: str = "s3") -> str | None:
    """The endpoint URL a user set for ``service`` (``AWS_ENDPOINT_URL_<SERVICE>`` first)."""
    specific = os.environ.get(f"AWS_ENDPOINT_URL_{service.upper().replace('-', '_')}")
    return specific or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    """``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else the profile's region, else us-east-1."""
    named = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if named:
        return named
    import boto3

    return boto3.session.Session().region_name or "us-east-1"


def refresh_margin() -> float:
    """:data:`REFRESH_MARGIN_ENV` (seconds), else 15 minutes."""
    value = os.environ.get(REFRESH_MARGIN_ENV)
    try:
        return float(value) if value else DEFAULT_REFRESH_MARGIN
    except ValueError:
        raise AwsError(f"{REFRESH_MARGIN_ENV} must be a number of seconds, got {value!r}") from None


# ---------------------------------------------------------------------------- sessions per process
#: environment settings of boto3's default chain: a session is made again when they change
_CHAIN_SETTINGS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                   "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
_sessions: dict[tuple[str | None, str, str | None, int], Any] = {}
_sessions_lock = threading.Lock()


def session(role_arn: str | None = None, *, purpose: str = "aws", region_name: str | None = None,
            sts_url: str | None = None) -> Any:
    """This process's boto3 session: its default chain, or ``role_arn`` assumed through STS
    (at ``sts_url``, else ``AWS_ENDPOINT_URL_STS``/``AWS_ENDPOINT_URL``) with credentials that
    renew themselves. One per (role, region, STS endpoint, default-chain settings) and process,
    so that a role is assumed once per process and renewed there; clients made from it
    sign every request with current credentials. Raises :class:`AwsError` with one line if
    the role cannot be assumed."""
    chain = tuple(os.environ.get(name) for name in _CHAIN_SETTINGS)
    key = (role_arn or None, region_name or region(), sts_url or endpoint_url("sts"), hash(chain))
    with _sessions_lock:
        found = _sessions.get(key)
    if found is not None:
        return found
    made = _role_session(role_arn, key[1], key[2], purpose) if role_arn else _default_session(key[1])
    with _sessions_lock:
        return _sessions.setdefault(key, made)


def forget_sessions() -> None:
    """Drop this process's sessions (the next call resolves credentials again)."""
    with _sessions_lock:
        _sessions.clear()
        _found.clear()


def _default_session(region_name: str) -> Any:
    import boto3

    return boto3.session.Session(region_name=region_name)


def _role_session(role_arn: str, region_name: str, sts_url: str | None, purpose: str) -> Any:
    """A boto3 session whose credentials are ``role_arn``'s, renewed before they expire."""
    import boto3
    import botocore.credentials
    import botocore.session

    sts = session(None, region_name=region_name, sts_url=sts_url).client("sts", endpoint_url=sts_url)

    def fetch() -> dict[str, Any]:
        answer = assume_role(role_arn, purpose=purpose, sts=sts)
        return {"access_key": answer["AccessKeyId"], "secret_key": answer["SecretAccessKey"],
                "token": answer["SessionToken"], "expiry_time": answer["Expiration"].isoformat()}

    margin = refresh_margin()
    credentials = botocore.credentials.RefreshableCredentials.create_from_metadata(
        fetch(), fetch, "assume-role", advisory_timeout=margin, mandatory_timeout=margin * 2 / 3)
    core = botocore.session.Session()
    core.register_component("credential_provider",
                            botocore.credentials.CredentialResolver([_Fixed(credentials)]))
    return boto3.session.Session(botocore_session=core, region_name=region_name)


class _Fixed:
    """A credential provider that hands botocore one (refreshable) credentials object."""

    METHOD = "model-runner"
    CANONICAL_NAME = "model-runner"

    def __init__(self, credentials: Any):
        self.credentials = credentials

    def load(self) -> Any:
        return self.credentials


_NONE = object()
_found: dict[int, Any] = {}


def credentials(owner: Any) -> Any:
    """The botocore credentials of ``owner`` (a session from :func:`session`), or None when
    this process has none at all; looked up once per session (a process without any would
    otherwise probe the instance metadata service on every call)."""
    found = _found.get(id(owner))
    if found is None:
        found = owner.get_credentials()
        _found[id(owner)] = _NONE if found is None else found
    return None if found is _NONE else found


def has_credentials() -> bool:
    """Whether this process has AWS credentials of its own (its default chain finds some)."""
    return credentials(session()) is not None


_renewed: dict[int, float] = {}


def renewable(found: Any) -> bool:
    """Whether ``found`` are temporary credentials that :func:`renew` can renew."""
    import botocore.credentials

    return isinstance(found, botocore.credentials.RefreshableCredentials)


def renew(found: Any) -> None:
    """Renew ``found`` (credentials that AWS has just rejected as expired) now, once however
    many threads saw the rejection: assumed-role and instance/task-role credentials fetch new
    ones; static keys have nothing to renew."""
    if not renewable(found):
        return
    with found._refresh_lock:  # botocore's own lock: no other thread refreshes meanwhile
        if time.monotonic() - _renewed.get(id(found), -1e9) < 1.0:
            return  # another thread has just renewed them
        try:
            found._protected_refresh(is_mandatory=True)  # botocore's refresh, forced
        except Exception as exc:  # noqa: BLE001 - the retry then fails with AWS's own answer
            log.warning("cannot renew AWS credentials (%s): %s", found.method, _first_line(exc))
        _renewed[id(found)] = time.monotonic()


def _first_line(exc: BaseException) -> str:
    from pipeline.redact import redact

    text = str(exc).strip().splitlines()
    return redact(text[0]) if text else type(exc).__name__


def is_expired_code(code: str) -> bool:
    """Whether an AWS error code means expired credentials."""
    return code in EXPIRED_CODES


def retry_expired_once(client: Any, found: Any) -> None:
    """Make ``client`` renew ``found`` and resend a request once when AWS answers that its
    credentials have expired (botocore builds and signs the request again for the retry)."""

    def handler(response: Any = None, attempts: int = 1, **_: Any) -> float | None:
        if attempts > 1 or not response:
            return None
        error = (response[1] or {}).get("Error", {})
        if not is_expired_code(str(error.get("Code", ""))):
            return None
        renew(found)
        return 0.0  # retry now

    client.meta.events.register("needs-retry", handler)


def client(service: str, role_arn: str | None = None, **kwargs: Any) -> Any:
    """A boto3 client for ``service`` (endpoint from ``AWS_ENDPOINT_URL[_<SERVICE>]``) with this
    process's credentials (``role_arn``'s, renewed before expiry), retried once on expiry."""
    owner = session(role_arn, purpose=service)
    made = owner.client(service, endpoint_url=endpoint_url(service), **kwargs)
    retry_expired_once(made, credentials(owner))
    return made


def assume_role(role_arn: str, *, purpose: str = "aws", sts: Any = None) -> dict[str, Any]:
    """Temporary credentials of ``role_arn`` (raises :class:`AwsError` with one line).

    The access key id, secret and session token are registered with
    :func:`pipeline.redact.register_secret` in this process, so no log, status, summary or
    exception shows them.
    """
    import boto3
    import botocore.exceptions

    from pipeline.redact import redact, register_secret

    if sts is None:
        sts = boto3.session.Session(region_name=region()).client("sts", endpoint_url=endpoint_url("sts"))
    try:
        answer = sts.assume_role(RoleArn=role_arn, RoleSessionName=f"model-runner-{purpose}"[:64])
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        message = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise AwsError(f"cannot assume role {role_arn}: {message}") from None
    found = dict(answer["Credentials"])
    for name in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
        register_secret(found.get(name))
    return found


def gdal_endpoint_options(url: str | None) -> dict[str, str]:
    """``AWS_ENDPOINT_URL``-style URL → GDAL's ``AWS_S3_ENDPOINT``/``AWS_HTTPS``/``AWS_VIRTUAL_HOSTING``."""
    if not url:
        return {}
    parts = urlsplit(url if "://" in url else f"https://{url}")
    host = parts.netloc + parts.path.rstrip("/")
    return {
        "AWS_S3_ENDPOINT": host,
        "AWS_HTTPS": "NO" if parts.scheme == "http" else "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


def gdal_s3_options(role_arn: str | None = None) -> GdalOptions:
    """Non-secret GDAL options to read ``/vsis3/`` with the user's AWS settings: region and
    endpoint, and (:data:`SIGNER_OPTION`, :data:`STS_OPTION`) where the reading process
    gets its credentials. ``role_arn`` is assumed here once (if this process has credentials to
    assume it with), so that a role that cannot be assumed fails in one line before any task."""
    options = GdalOptions(AWS_REGION=region(), **gdal_endpoint_options(endpoint_url("s3")))
    options[SIGNER_OPTION] = role_arn or "default"
    sts = endpoint_url("sts")
    if role_arn and sts:
        options[STS_OPTION] = sts
    if role_arn and has_credentials():
        session(role_arn, purpose="image-read", region_name=options["AWS_REGION"], sts_url=sts)
    return options


def read_session(options: dict[str, str]) -> Any:
    """The boto3 session this process signs reads under ``options`` with (None: not S3)."""
    source = options.get(SIGNER_OPTION)
    if source is None:
        return None
    role = None if source == "default" else source
    return session(role, purpose="image-read", region_name=options.get("AWS_REGION"),
                   sts_url=options.get(STS_OPTION))


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise AwsError(f"not an s3:// URL: {url}")
    return parts.netloc, parts.path.lstrip("/")
