"""S3 through boto3: parse ``s3://bucket/prefix``, list, download, upload and delete.

The client is configured from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` and
``AWS_ENDPOINT_URL`` for an S3-compatible server such as SeaweedFS or MinIO). With a custom
endpoint it uses path-style addressing, which those servers expect. Credentials are never logged
or put in an error message: failures become a one-line :class:`StorageError` naming the URI and
the S3 error code.

Every call is bounded (:class:`Limits`): ``QPROBE_S3_CONNECT_TIMEOUT`` and ``QPROBE_S3_READ_TIMEOUT``
(seconds) and ``QPROBE_S3_MAX_ATTEMPTS`` (tries, the first included). With the defaults an endpoint
that accepts connections and never answers fails in under a minute, naming the endpoint.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError

SCHEME = "s3://"
# botocore's standard retry mode sleeps rand(0, 1) * 2**i s after try i (0-based) before the next.
_MAX_BACKOFF_S = 20.0


class StorageError(QProbeError, OSError):
    """An S3 location that cannot be parsed, reached or read."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """An S3 object that is not there: a caller handles it as it handles a missing local file."""


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str

    def uri(self, bucket: str) -> str:
        return f"{SCHEME}{bucket}/{self.key}"


@dataclass(frozen=True)
class Limits:
    """How long one S3 call may wait: seconds to connect, seconds per read, tries (the first included)."""

    connect_timeout: float = 5.0
    read_timeout: float = 12.0
    max_attempts: int = 3

    def worst_case_s(self) -> float:
        """The longest a call against a silent endpoint can take: every try timed out, every backoff at its maximum."""
        backoff = sum(min(2.0**i, _MAX_BACKOFF_S) for i in range(self.max_attempts - 1))
        return self.max_attempts * (self.connect_timeout + self.read_timeout) + backoff


_LIMIT_ENV = {"connect_timeout": "QPROBE_S3_CONNECT_TIMEOUT", "read_timeout": "QPROBE_S3_READ_TIMEOUT",
              "max_attempts": "QPROBE_S3_MAX_ATTEMPTS"}


def limits() -> Limits:
    """The :class:`Limits` the environment sets (see the module docstring); defaults where unset."""
    values: dict[str, float | int] = {}
    for name, var in _LIMIT_ENV.items():
        text = os.environ.get(var, "").strip()
        if not text:
            continue
        kind = int if name == "max_attempts" else float
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise StorageError(f"{var}={text!r}: expected a positive {'integer' if kind is int else 'number'}")
        values[name] = value
    return Limits(**values)


def is_s3_uri(text: str) -> bool:
    return text.startswith(SCHEME)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/a/b"`` -> ``("bucket", "a/b")``; the prefix may be empty."""
    if not is_s3_uri(uri):
        raise StorageError(f"{uri}: not an S3 URI (expected s3://bucket/prefix)")
    bucket, _, prefix = uri[len(SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name")
    return bucket, prefix


@functools.lru_cache(maxsize=1)
def client() -> Any:
    """A boto3 S3 client from the environment, one per process (boto3 clients are thread-safe, not fork-safe)."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    bounds = limits()
    config = Config(
        retries={"total_max_attempts": bounds.max_attempts, "mode": "standard"},  # tries, the first included
        connect_timeout=bounds.connect_timeout,
        read_timeout=bounds.read_timeout,
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _error(uri: str, exc: Exception) -> StorageError:
    from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        bounds = limits()
        return StorageError(
            f"{uri}: no answer from the S3 endpoint {client().meta.endpoint_url} ({type(exc).__name__} after "
            f"{bounds.max_attempts} tries of {bounds.connect_timeout:g} s to connect, {bounds.read_timeout:g} s to "
            f"read; QPROBE_S3_CONNECT_TIMEOUT, QPROBE_S3_READ_TIMEOUT and QPROBE_S3_MAX_ATTEMPTS set them)")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "error")
        reason = {"NoSuchBucket": "bucket not found", "NoSuchKey": "no such object", "404": "not found",
                  "AccessDenied": "access denied", "403": "access denied"}.get(code, err.get("Message") or code)
        kind = ObjectNotFound if code in ("NoSuchKey", "404") else StorageError
        return kind(f"{uri}: {reason} ({code})")
    if isinstance(exc, BotoCoreError):
        # botocore's messages name the endpoint or the missing setting, never a secret.
        return StorageError(f"{uri}: {exc}")
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")


def list_objects(uri: str, suffixes: frozenset[str] | None = None) -> Iterator[S3Object]:
    """Objects under ``uri`` (recursively), in key order; only keys ending in ``suffixes`` when given."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_uri(uri)
    paginator = client().get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") or (suffixes and Path(key).suffix.lower() not in suffixes):
                    continue
                yield S3Object(key=key, size=int(obj["Size"]), etag=obj.get("ETag", "").strip('"'))
    except (ClientError, BotoCoreError) as exc:
        raise _error(uri, exc) from exc


def download_bytes(uri: str, first: int | None = None) -> bytes:
    """The whole object at ``uri``, or only its ``first`` bytes (a header); :class:`ObjectNotFound` if absent."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_uri(uri)
    extra = {"Range": f"bytes=0-{first - 1}"} if first else {}
    try:
        return client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        raise _error(uri, exc) from exc


def upload_bytes(data: bytes, uri: str) -> str:
    """Write ``data`` as the object ``uri`` in one PUT (a reader sees the old object or the new, never part); returns ``uri``."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _object_key(uri)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data)
    except (ClientError, BotoCoreError) as exc:
        raise _error(uri, exc) from exc
    return uri


def delete_object(uri: str) -> None:
    """Delete the object ``uri``; an object that is not there is not an error (S3's own rule)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _object_key(uri)
    try:
        client().delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        raise _error(uri, exc) from exc


def _object_key(uri: str) -> tuple[str, str]:
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri}: needs an object key, not a prefix")
    return bucket, key


def download_file(uri: str, path: str | Path) -> Path:
    """Download ``uri`` to ``path`` atomically (a partial download never lands at ``path``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from qprobe.io import atomic_path

    bucket, key = parse_s3_uri(uri)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            client().download_file(bucket, key, str(tmp))
    except (ClientError, BotoCoreError) as exc:
        raise _error(uri, exc) from exc
    return path


def upload_file(path: str | Path, uri: str) -> str:
    """Upload the local file ``path`` to ``uri``; returns ``uri``."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _object_key(uri)
    if not Path(path).is_file():
        raise StorageError(f"{path}: no such file to upload")
    try:
        client().upload_file(str(path), bucket, key)
    except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
        raise _error(uri, exc) from exc
    return uri


def upload_dir(folder: str | Path, uri: str) -> list[str]:
    """Upload every file under ``folder`` to ``uri/<relative path>``; returns the URIs written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StorageError(f"{folder}: no such folder to upload")
    base = uri.rstrip("/")
    return [upload_file(p, f"{base}/{p.relative_to(folder).as_posix()}")
            for p in sorted(folder.rglob("*")) if p.is_file()]


def sync_prefix(uri: str, folder: str | Path, suffixes: frozenset[str] | None = None) -> tuple[list[Path], int]:
    """Mirror the objects under ``uri`` into ``folder``; returns (files downloaded, files already there).

    Resumable: a file already present with the object's size is kept. The prefix is matched as a
    folder (``s3://b/koniq`` does not also pull ``s3://b/koniq10k-old/``), and a key that would land
    outside ``folder`` is refused.
    """
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    folder = Path(folder)
    fetched: list[Path] = []
    kept = 0
    for obj in list_objects(f"{SCHEME}{bucket}/{prefix}", suffixes):
        relpath = Path(obj.key[len(prefix):])
        if ".." in relpath.parts or relpath.is_absolute():
            raise StorageError(f"{obj.uri(bucket)}: object key leaves the prefix; refusing to download it")
        dest = folder / relpath
        if dest.is_file() and dest.stat().st_size == obj.size:
            kept += 1
            continue
        fetched.append(download_file(obj.uri(bucket), dest))
    return fetched, kept
