"""S3 and S3-compatible stores (MinIO, Ceph, R2, ...): the Backend of s3:// places, as the object-store
primitives of runner/store/objects.py (which holds what is done with them: sources, outputs, checkpoints).

The client, its environment (AWS_*, FINETUNE_STORE_TIMEOUTS), its errors and its transfers of many objects are
s3_client.py. The lease's conditional writes are PutObject IfNoneMatch='*' / IfMatch=<ETag> and DeleteObject
IfMatch=<ETag>; an object's version is its ETag.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from . import checksums, s3_client
from .backend import Versioned
from .checksums import Checksum
from .objects import ObjectBackend, StoredObject
from .s3_client import client, endpoint_url, region

_MISSING = ("NoSuchKey", "404", "NotFound")


class S3Backend(ObjectBackend):
    scheme = "s3"
    key_word = "key"
    translate = staticmethod(s3_client.translate)

    def where(self) -> str:
        return s3_client.where()

    def endpoint(self) -> str:
        return endpoint_url() or f"aws:{region()}"

    def require_credentials(self) -> None:
        if not s3_client.has_credentials():
            from botocore.exceptions import NoCredentialsError

            raise NoCredentialsError()

    def checksum(self, o: StoredObject, rel: str) -> Checksum | None:
        return checksums.of_s3_etag(rel, o.size, o.version)  # the version is the ETag

    def check_bucket(self, bucket: str) -> None:
        client().head_bucket(Bucket=bucket)

    def list_objects(self, bucket: str, prefix: str) -> Iterator[StoredObject]:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):
                    yield StoredObject(o["Key"], int(o["Size"]), o.get("ETag", ""))

    def head_object(self, bucket: str, key: str) -> StoredObject | None:
        head = _unless_missing(lambda: client().head_object(Bucket=bucket, Key=key))
        return None if head is None else StoredObject(key, int(head["ContentLength"]), head.get("ETag", ""))

    def get_object(self, bucket: str, key: str) -> Versioned | None:
        got = _unless_missing(lambda: client().get_object(Bucket=bucket, Key=key))
        return None if got is None else Versioned(got["Body"].read(), got["ETag"])

    def put_object(self, bucket: str, key: str, data: bytes, *, if_absent: bool = False,
                   if_version: str | None = None, content_type: str | None = None) -> str | None:
        extra = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_version} if if_version is not None else {}
        if content_type:
            extra["ContentType"] = content_type
        try:
            return client().put_object(Bucket=bucket, Key=key, Body=data, **extra)["ETag"]
        except Exception as e:  # noqa: BLE001
            if (if_absent and _precondition_failed(e)) or (if_version is not None and _changed(e)):
                return None
            raise

    def delete_object_if(self, bucket: str, key: str, version: str) -> bool:
        try:
            client().delete_object(Bucket=bucket, Key=key, IfMatch=version)
            return True
        except Exception as e:  # noqa: BLE001
            if _changed(e):
                return False
            raise

    def upload_objects(self, bucket: str, pairs: list[tuple[Path, str]]) -> None:
        s3_client.upload_files(client(), bucket, pairs)

    def download_objects(self, bucket: str, pairs: list[tuple[str, Path]]) -> None:
        s3_client.download_objects(client(), bucket, pairs)

    def copy_objects(self, bucket: str, pairs: list[tuple[str, str]]) -> None:
        s3_client.copy_keys(client(), bucket, pairs)

    def delete_objects(self, bucket: str, keys: list[str]) -> None:
        s3_client.delete_keys(client(), bucket, keys)


def _unless_missing(call):
    """call()'s answer, or None when S3 says the object is not there."""
    try:
        return call()
    except Exception as e:  # noqa: BLE001
        if _code(e) in _MISSING:
            return None
        raise


def _code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code") or "")


def _precondition_failed(e: BaseException) -> bool:
    status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412)


def _changed(e: BaseException) -> bool:
    """A conditional write or delete found another version there, or none at all."""
    return _precondition_failed(e) or _code(e) in ("NoSuchKey", "404")
