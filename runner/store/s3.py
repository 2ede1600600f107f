"""S3 and S3-compatible stores (MinIO, Ceph, R2, ...): the Backend of s3:// places.

The client, its environment (AWS_*, FINETUNE_STORE_TIMEOUTS), its errors and transfers are s3_client.py;
publishing and the destination's ownership rules are s3_output.py. The lease's conditional writes are
PutObject IfNoneMatch='*' / IfMatch=<ETag> and DeleteObject IfMatch=<ETag>; a cache key is the listing of the
prefix (keys, sizes, ETags) at the endpoint the environment points at.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path, PurePosixPath

from runner.api.errors import DOWNLOAD_FAILED, UPLOAD_FAILED, PermanentError
from runner.api.uris import Location

from . import s3_output
from .backend import Backend, Revision, Versioned
from .s3_client import (  # noqa: F401 - the client's helpers, importable from here
    client, delete_keys, dir_prefix, download_objects, endpoint_url, errors, exists, get_bytes, list_objects,
    region, require_credentials, safe_relative, translate, upload_files,
)


def _key(loc: Location, rel: str) -> str:
    return f"{loc.path}/{rel}" if loc.path else rel


def _read(loc: Location, what: str = "read"):
    return errors(what, str(loc), loc.bucket, DOWNLOAD_FAILED)


def _write(loc: Location, what: str = "write to"):
    return errors(what, str(loc), loc.bucket, UPLOAD_FAILED)


class S3Backend(Backend):
    scheme = "s3"
    folder_word = "prefix"

    # ------------------------------------------------------------------------------------- sources
    def check_source(self, loc: Location, *, repo_type: str = "model") -> None:
        uri = str(loc)
        require_credentials("read", uri, DOWNLOAD_FAILED)
        with _read(loc):
            c = client()
            resp = c.list_objects_v2(Bucket=loc.bucket, Prefix=dir_prefix(loc.path), MaxKeys=1)
            if resp.get("KeyCount", len(resp.get("Contents", []))):
                return
            if loc.path and exists(c, loc.bucket, loc.path):
                return
        raise PermanentError(
            f"nothing found at {uri} (no object with that key and none under that prefix): "
            "upload the files there or fix the URI",
            reason=DOWNLOAD_FAILED,
        )

    def list_names(self, loc: Location, *, repo_type: str = "model") -> list[str]:
        with _read(loc):
            return [key[len(dir_prefix(loc.path)):] for key, _ in list_objects(client(), loc.bucket, loc.path)]

    def download(self, loc: Location, dest: Path, *, repo_type: str = "model",
                 allow_patterns: list[str] | None = None) -> Path:
        """Everything under the prefix into `dest` (returned), or the single object `loc.path` as dest/<name>."""
        uri, dest = str(loc), Path(dest)
        with _read(loc, "download"):
            c = client()
            objects = list_objects(c, loc.bucket, loc.path)
            if not objects and loc.path and exists(c, loc.bucket, loc.path):
                target = dest / PurePosixPath(loc.path).name
                download_objects(c, loc.bucket, [(loc.path, target)])
                return target
            if not objects:
                raise PermanentError(f"nothing to download at {uri}: upload the files there or fix the URI",
                                     reason=DOWNLOAD_FAILED)
            items = []
            for key, _ in objects:
                rel = safe_relative(key, loc.path)
                if allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                    items.append((key, dest / rel))
            dest.mkdir(parents=True, exist_ok=True)
            download_objects(c, loc.bucket, items)
        return dest

    def revision(self, loc: Location, *, repo_type: str = "model") -> Revision:
        with _read(loc):
            c = client()
            listing = []
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=dir_prefix(loc.path)):
                listing += [[o["Key"], int(o["Size"]), o.get("ETag", "")] for o in page.get("Contents", [])
                            if not o["Key"].endswith("/")]
            if not listing and loc.path:
                head = c.head_object(Bucket=loc.bucket, Key=loc.path)
                listing = [[loc.path, int(head["ContentLength"]), head.get("ETag", "")]]
        rev = hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()[:16]
        endpoint = endpoint_url() or f"aws:{region()}"
        return Revision(loc, rev, f"s3|{endpoint}|{loc.bucket}|{loc.path}|{rev}", f"{loc} (listing {rev})")

    # ------------------------------------------------------------------------------------- outputs
    def check_destination(self, loc: Location, job: dict | None = None) -> None:
        s3_output.check_destination(loc, job)

    def publish(self, local_dir: Path, loc: Location, *, private: bool = True,
                commit_message: str = "Upload fine-tuned model", job: dict | None = None) -> str:
        return s3_output.publish(Path(local_dir), loc, job=job)

    def read_manifest(self, loc: Location) -> dict | None:
        return s3_output.read_manifest(loc)

    def is_complete(self, loc: Location) -> bool:
        return s3_output.is_complete(loc)

    def read_text(self, loc: Location, rel: str) -> str | None:
        with _read(loc):
            data = get_bytes(client(), loc.bucket, _key(loc, rel))
        return None if data is None else data.decode("utf-8")

    # ------------------------------------------------------------------------------------- checkpoints
    def check_writable(self, loc: Location) -> None:
        s3_output.check_destination(loc, output=False)

    def list_files(self, loc: Location) -> list[str]:
        with _read(loc, "list"):
            return [key[len(dir_prefix(loc.path)):] for key, _ in list_objects(client(), loc.bucket, loc.path)]

    def put_files(self, loc: Location, items: list[tuple[Path, str]]) -> None:
        with _write(loc):
            upload_files(client(), loc.bucket, [(Path(path), _key(loc, rel)) for path, rel in items])

    def get_files(self, loc: Location, items: list[tuple[str, Path]]) -> None:
        for rel, _ in items:
            safe_relative(_key(loc, rel), loc.path)
        with _read(loc, "download"):
            download_objects(client(), loc.bucket, [(_key(loc, rel), Path(target)) for rel, target in items])

    def delete_files(self, loc: Location, rels: list[str]) -> None:
        with _write(loc, "delete from"):
            delete_keys(client(), loc.bucket, [_key(loc, rel) for rel in rels])

    def write_text(self, loc: Location, rel: str, text: str) -> None:
        with _write(loc):
            client().put_object(Bucket=loc.bucket, Key=_key(loc, rel), Body=text.encode("utf-8"))

    # ------------------------------------------------------------------------------------- the lease
    def create_if_absent(self, loc: Location, rel: str, data: bytes) -> str | None:
        with _write(loc, f"create {rel} in"):
            try:
                return client().put_object(Bucket=loc.bucket, Key=_key(loc, rel), Body=data, IfNoneMatch="*")["ETag"]
            except Exception as e:  # noqa: BLE001
                if _precondition_failed(e):
                    return None
                raise

    def read_versioned(self, loc: Location, rel: str) -> Versioned | None:
        with _read(loc, f"read {rel} in"):
            try:
                r = client().get_object(Bucket=loc.bucket, Key=_key(loc, rel))
            except Exception as e:  # noqa: BLE001
                if _code(e) in ("NoSuchKey", "404"):
                    return None
                raise
            return Versioned(r["Body"].read(), r["ETag"])

    def replace_if_unchanged(self, loc: Location, rel: str, data: bytes, version: str) -> str | None:
        with _write(loc, f"replace {rel} in"):
            try:
                return client().put_object(Bucket=loc.bucket, Key=_key(loc, rel), Body=data, IfMatch=version)["ETag"]
            except Exception as e:  # noqa: BLE001
                if _precondition_failed(e) or _code(e) in ("NoSuchKey", "404"):
                    return None
                raise

    def delete_if_unchanged(self, loc: Location, rel: str, version: str) -> bool:
        with _write(loc, f"delete {rel} in"):
            try:
                client().delete_object(Bucket=loc.bucket, Key=_key(loc, rel), IfMatch=version)
                return True
            except Exception as e:  # noqa: BLE001
                if _precondition_failed(e) or _code(e) in ("NoSuchKey", "404"):
                    return False
                raise


def _code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code") or "")


def _precondition_failed(e: BaseException) -> bool:
    status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412)
