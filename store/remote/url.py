"""Remote URLs: `s3://BUCKET/PREFIX` names a folder of an S3-compatible bucket."""

from __future__ import annotations

import re
from dataclasses import dataclass

from processfork.store.remote.errors import InvalidRemoteUrl

__all__ = ["RemoteUrl", "parse_url"]

# S3's bucket rules, loosely: 3 to 63 characters, lowercase letters, digits, dots and hyphens.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class RemoteUrl:
    bucket: str
    prefix: str  # "" or a folder path without leading or trailing "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, path: str) -> str:
        """The object key of `path` inside the remote's folder."""
        return f"{self.prefix}/{path}" if self.prefix else path


def parse_url(text: str) -> RemoteUrl:
    if not isinstance(text, str) or not text.startswith("s3://"):
        raise InvalidRemoteUrl(str(text), "a remote is s3://BUCKET or s3://BUCKET/PREFIX")
    rest = text[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise InvalidRemoteUrl(text, "a bucket name is 3 to 63 lowercase letters, digits, . or -")
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts) or any(ord(c) < 0x20 for c in prefix):
        raise InvalidRemoteUrl(text, "the prefix has no '.', '..' or control characters")
    return RemoteUrl(bucket, "/".join(parts))
