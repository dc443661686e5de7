"""Lake storage: ``file://`` and ``s3://`` URIs behind one small interface.

Keys are ``/``-separated paths relative to the storage root. ``put_bytes`` is atomic in both
implementations: a reader sees the whole old object or the whole new one, never a torn write. On the local
disk that is write-to-temp + fsync + rename + fsync(dir); on S3 a single PutObject already is. ``put_many``
writes several objects, each atomically, and returns once all are durable: on the local disk each directory
is synced once for all the renames in it; on S3 the puts run concurrently. When it raises, any of the objects
may or may not have been written (each whole or not at all).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from flywheel.settings import LakeSettings


class Storage(Protocol):
    uri: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_many(self, items: list[tuple[str, bytes]]) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...


class LocalStorage:
    """A directory on the local disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root != path and self.root not in path.parents:
            raise ValueError(f"key {key!r} escapes the storage root")
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        self.put_many([(key, data)])

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        dirs: set[Path] = set()
        for key, data in items:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # the data before the rename: a crash never leaves a torn file
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dirs.add(path.parent)
        for directory in sorted(dirs):  # make the renames durable: once per directory
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Client(Protocol):
    """The part of boto3's S3 client the lake uses."""

    def put_object(self, *, Bucket: str, Key: str, Body: bytes) -> Any: ...  # noqa: N803 (boto3's names)
    def get_object(self, *, Bucket: str, Key: str) -> Any: ...  # noqa: N803
    def head_object(self, *, Bucket: str, Key: str) -> Any: ...  # noqa: N803
    def delete_object(self, *, Bucket: str, Key: str) -> Any: ...  # noqa: N803
    def get_paginator(self, operation_name: str) -> Any: ...


class S3Storage:
    """A prefix in an S3 bucket, through boto3 (any S3 API: AWS, MinIO, moto)."""

    def __init__(self, bucket: str, prefix: str, client: S3Client):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        if len(items) <= 1:
            for key, data in items:
                self.put_bytes(key, data)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(8, len(items))) as pool:  # boto3 clients are thread-safe
            for future in [pool.submit(self.put_bytes, key, data) for key, data in items]:
                future.result()

    def get_bytes(self, key: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        data: bytes = body.read()
        return data

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def open_storage(uri: str, lake: LakeSettings | None = None) -> Storage:
    """Storage for a ``file://`` or ``s3://`` URI (a bare path counts as a local directory)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return LocalStorage(parsed.path if parsed.scheme else uri)
    if parsed.scheme == "s3":
        import boto3

        lake = lake or LakeSettings()
        client = boto3.client(
            "s3",
            endpoint_url=lake.s3_endpoint_url,
            region_name=lake.s3_region,
            aws_access_key_id=lake.aws_access_key_id.get_secret_value() if lake.aws_access_key_id else None,
            aws_secret_access_key=(
                lake.aws_secret_access_key.get_secret_value() if lake.aws_secret_access_key else None
            ),
        )
        return S3Storage(parsed.netloc, parsed.path, client)
    raise ValueError(f"unsupported storage URI {uri!r}: use file:///path or s3://bucket/prefix")


def parquet_bytes(table: object) -> bytes:
    """Serialize a pyarrow Table to Parquet bytes (zstd), ready for ``put_bytes``."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
