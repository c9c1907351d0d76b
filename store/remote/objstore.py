"""The object storage a remote lives in: S3's few calls a remote needs, through boto3.

boto3 is AWS's own client. It reads the endpoint (`AWS_ENDPOINT_URL`), the credentials and the
region from the standard AWS environment variables and config files, speaks every S3-compatible
service (AWS, MinIO, Ceph, R2, SeaweedFS), and passes S3's conditional writes (`If-Match`,
`If-None-Match`) through. It is thread-safe per client, so one client serves the parallel range
reads and pack uploads. It loads on first use: `pf log` never pays for it.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from processfork.store.remote.errors import RemoteError, RemoteUnreachable
from processfork.store.remote.pack import PackBody
from processfork.store.remote.url import RemoteUrl

__all__ = ["ConditionFailed", "ListedObject", "ObjectStore", "ObjectStream", "Stored"]


class ConditionFailed(RemoteError):
    """A conditional write lost: the object changed (If-Match) or exists (If-None-Match)."""


@dataclass(frozen=True)
class Stored:
    data: bytes
    etag: str


@dataclass(frozen=True)
class ListedObject:
    key: str  # relative to the remote's folder
    size: int
    modified: float  # Unix seconds


class ObjectStore:
    """One remote's folder in one bucket. Counts its requests and bytes (for reports)."""

    def __init__(self, url: RemoteUrl, *, parallelism: int = 8) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise RemoteError(
                "remotes need boto3: pip install 'processfork-vllm[remote]'"
            ) from None

        self.url = url
        self.parallelism = parallelism
        config = Config(
            max_pool_connections=parallelism + 4,
            retries={"max_attempts": 4, "mode": "standard"},
        )
        self._client: Any = boto3.session.Session().client("s3", config=config)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.requests = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def pool(self) -> ThreadPoolExecutor:
        """`parallelism` threads for this remote's requests, started once and kept: on a busy
        machine a thread takes a while to start, so every call re-using them saves that."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.parallelism, thread_name_prefix="pf-remote"
                )
            return self._pool

    # -- reads ---------------------------------------------------------------------------------
    def get(self, path: str, byte_range: tuple[int, int] | None = None) -> Stored | None:
        """The object at `path` (or bytes [start, end) of it), None when it does not exist."""
        kwargs: dict[str, Any] = {"Bucket": self.url.bucket, "Key": self.url.key(path)}
        if byte_range is not None:
            start, end = byte_range
            kwargs["Range"] = f"bytes={start}-{end - 1}"
        try:
            reply = self._call("get_object", **kwargs)
        except _NotFound:
            return None
        data = reply["Body"].read()
        self.bytes_received += len(data)
        return Stored(data, reply.get("ETag", ""))

    def open(self, path: str, byte_range: tuple[int, int]) -> ObjectStream | None:
        """Bytes [start, end) of the object at `path` as a stream, None when it does not exist.
        A reader takes each object of a range read as soon as its bytes arrive, straight from
        the connection: no buffer of the whole range, and no copy of it."""
        start, end = byte_range
        try:
            reply = self._call(
                "get_object",
                Bucket=self.url.bucket,
                Key=self.url.key(path),
                Range=f"bytes={start}-{end - 1}",
            )
        except _NotFound:
            return None
        return ObjectStream(self, path, reply["Body"])

    def list(self, folder: str) -> list[ListedObject]:
        """Every object under `folder/`, keys relative to the remote's folder."""
        base = self.url.key(folder.rstrip("/") + "/")
        strip = len(self.url.key(""))
        out: list[ListedObject] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.url.bucket, "Prefix": base}
            if token:
                kwargs["ContinuationToken"] = token
            reply = self._call("list_objects_v2", **kwargs)
            for item in reply.get("Contents", []):
                out.append(
                    ListedObject(
                        item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp()
                    )
                )
            if not reply.get("IsTruncated"):
                return out
            token = reply.get("NextContinuationToken")

    # -- writes --------------------------------------------------------------------------------
    def put(
        self, path: str, data: bytes | PackBody, *, if_match: str | None = None, if_absent: bool = False
    ) -> str:
        """Write `path`; returns the new ETag. `if_match`: only over that ETag; `if_absent`: only
        where nothing exists. A lost condition raises ConditionFailed."""
        kwargs: dict[str, Any] = {"Bucket": self.url.bucket, "Key": self.url.key(path), "Body": data}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        reply = self._call("put_object", **kwargs)
        self.bytes_sent += len(data)
        return reply.get("ETag", "")

    def delete(self, path: str, *, if_match: str | None = None) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.url.bucket, "Key": self.url.key(path)}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            self._call("delete_object", **kwargs)
        except _NotFound:
            pass  # already gone: what a delete asks for

    # -- errors --------------------------------------------------------------------------------
    def _call(self, op: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        self.requests += 1
        try:
            return getattr(self._client, op)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise _NotFound() from None
            if code == "PreconditionFailed" or status == 412:
                raise ConditionFailed(f"{kwargs.get('Key')}: changed concurrently") from None
            if code == "NoSuchBucket":
                raise RemoteUnreachable(str(self.url), f"no bucket {self.url.bucket!r}") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise RemoteUnreachable(str(self.url), f"access denied ({code})") from None
            message = error.get("Message") or code
            raise RemoteError(f"{op} {kwargs.get('Key', '')}: {message} ({code})") from None
        except BotoCoreError as exc:
            raise RemoteUnreachable(str(self.url), _one_line(exc)) from None


class ObjectStream:
    """The body of one GET, read in pieces of known length."""

    def __init__(self, store: ObjectStore, path: str, body: Any) -> None:
        self._store = store
        self._path = path
        self._body = body

    def read(self, n: int) -> bytes:
        """Exactly `n` bytes. The object ending sooner is a RemoteError; a connection that
        breaks (or stalls past the client's timeout) is RemoteUnreachable."""
        from botocore.exceptions import BotoCoreError

        try:
            data = self._body.read(n)
            while 0 < len(data) < n:  # a body returns short reads only at its end
                more = self._body.read(n - len(data))
                if not more:
                    break
                data += more
        except BotoCoreError as exc:
            raise RemoteUnreachable(str(self._store.url), _one_line(exc)) from None
        if len(data) != n:
            raise RemoteError(f"remote {self._store.url}: {self._path} is shorter than its index says")
        self._store.bytes_received += n
        return data

    def close(self) -> None:
        # A connection that cannot close cleanly is dropped, which is all a close asks for.
        with contextlib.suppress(Exception):
            self._body.close()


class _NotFound(Exception):
    pass


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
