"""Fixtures of the remote tests: one SeaweedFS server per session, a fresh remote per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from processfork_dev.s3_server import BUCKET, S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def remote_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty remote (a fresh folder of the test bucket), with the AWS environment set."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path
