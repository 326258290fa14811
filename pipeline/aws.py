"""AWS conventions for boto3 and GDAL alike: credentials, region, endpoints, assumed roles.

Users configure AWS the usual way (the default boto3 chain: env vars, profiles, instance roles;
``AWS_REGION``; ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``). :func:`gdal_s3_options`
resolves that once, in the client, into a small picklable dict of GDAL config options
(``AWS_S3_ENDPOINT``, ``AWS_HTTPS``, ``AWS_VIRTUAL_HOSTING``, credentials) that every read
applies with ``rasterio.Env(**options)``: Dask workers that started before the settings changed
still read with the right ones, and an ``imageReadRole`` applies to that image only.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

#: option names whose values are secret (never logged, never in a summary)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class AwsError(RuntimeError):
    """An AWS setting or call that failed; ``str()`` is one line without secrets."""


class GdalOptions(dict[str, str]):
    """GDAL config options for one image's reads; ``repr`` hides the secret values."""

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


def session(role_arn: str | None = None, *, purpose: str = "aws") -> Any:
    """A boto3 session: the default chain, or ``role_arn`` assumed through STS."""
    import boto3

    if not role_arn:
        return boto3.session.Session(region_name=region())
    credentials = assume_role(role_arn, purpose=purpose)
    return boto3.session.Session(
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
        region_name=region(),
    )


def client(service: str, role_arn: str | None = None) -> Any:
    """A boto3 client for ``service`` (endpoint from ``AWS_ENDPOINT_URL[_<SERVICE>]``)."""
    return session(role_arn, purpose=service).client(service, endpoint_url=endpoint_url(service))


def assume_role(role_arn: str, *, purpose: str = "aws") -> dict[str, Any]:
    """Temporary credentials of ``role_arn`` (raises :class:`AwsError` with one line).

    The access key id, secret and session token are registered with
    :func:`pipeline.redact.register_secret`, so no log, status, summary or exception shows them.
    """
    import boto3
    import botocore.exceptions

    from pipeline.redact import redact, register_secret

    sts = boto3.session.Session(region_name=region()).client(
        "sts", endpoint_url=endpoint_url("sts")
    )
    try:
        answer = sts.assume_role(RoleArn=role_arn, RoleSessionName=f"model-runner-{purpose}"[:64])
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        message = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
        raise AwsError(f"cannot assume role {role_arn}: {message}") from None
    credentials = dict(answer["Credentials"])
    for name in ("AccessKeyId", "SecretAccessKey", "SessionToken"):
        register_secret(credentials.get(name))
    return credentials


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
    """GDAL options to read ``/vsis3/`` with the user's AWS settings (and ``role_arn``).

    Credentials are resolved here through boto3 (so profiles and instance roles work too);
    without any, reads are unsigned (``AWS_NO_SIGN_REQUEST``) for public buckets.
    """
    options = GdalOptions(AWS_REGION=region(), **gdal_endpoint_options(endpoint_url("s3")))
    if role_arn:
        credentials = assume_role(role_arn, purpose="image-read")
        options.update(
            AWS_ACCESS_KEY_ID=credentials["AccessKeyId"],
            AWS_SECRET_ACCESS_KEY=credentials["SecretAccessKey"],
            AWS_SESSION_TOKEN=credentials["SessionToken"],
        )
        return options
    found = session().get_credentials()
    if found is None:
        options["AWS_NO_SIGN_REQUEST"] = "YES"
        return options
    frozen = found.get_frozen_credentials()
    options.update(AWS_ACCESS_KEY_ID=frozen.access_key, AWS_SECRET_ACCESS_KEY=frozen.secret_key)
    if frozen.token:
        options["AWS_SESSION_TOKEN"] = frozen.token
    return options


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise AwsError(f"not an s3:// URL: {url}")
    return parts.netloc, parts.path.lstrip("/")
