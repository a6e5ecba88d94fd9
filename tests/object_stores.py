"""Object stores on 127.0.0.1 for tests: the GCS emulator, moto's S3 server, and a fault proxy.

The servers run as their own sessions (start_new_session), so a test that kills a job's process
group never takes its storage with it, and they keep their objects for the whole pytest session.
`client_env` is what a job needs to reach them: endpoints through each library's own variable and
test credentials that belong to nobody. Nothing listens beyond the loopback.

The fault proxy sits in front of the GCS emulator (gcsfs and TensorStore both speak plain HTTP to
it) and injects, per request, a fixed latency, HTTP 503s, HTTP 403s or dropped connections, as the
test sets them while a job runs.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pathlib
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout} s")


def _server(argv: list[str], port: int, name: str, log: pathlib.Path, cwd: pathlib.Path) -> subprocess.Popen:
    process = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=cwd,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _wait_for_port(port, process, name)
    return process


def _tool(name: str) -> str:
    """A console script of the running interpreter's environment (the venv's bin)."""
    candidate = pathlib.Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not installed: make test installs requirements-test.txt")
    return found


class FaultProxy(socketserver.ThreadingTCPServer):
    """HTTP/1.1 forwarder that injects faults per request (see module docstring).

    `latency_s` delays every request; `fail_next` makes the next N requests answer 503; `deny`
    answers every request 403; `reset_next` closes the next N connections without an answer;
    `only_objects`, when set, limits the 503s and resets to requests whose target contains it
    (object names are URL-encoded there: "data%2F" for objects under data/). Counters say what was injected, so a test can check that its faults were met.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream_port: int, port: int):
        self.upstream_port = upstream_port
        self.latency_s = 0.0
        self.fail_next = 0
        self.reset_next = 0
        self.deny = False
        self.only_objects = ""
        self.injected = {"503": 0, "403": 0, "reset": 0}
        self.requests = 0
        self._lock = threading.Lock()
        # The emulator serves one connection at a time with a listen backlog of 5: more requests at
        # once overflow it, and each dropped connection attempt waits a 1 s SYN retransmit. Clients
        # may have any number in flight here (latency is injected before this), as with real GCS.
        self.upstream_slots = threading.Semaphore(4)
        super().__init__(("127.0.0.1", port), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def clear(self) -> None:
        """No faults armed and the counters at zero (each test that takes a bucket starts so)."""
        with self._lock:
            self.latency_s, self.fail_next, self.reset_next, self.deny = 0.0, 0, 0, False
            self.only_objects = ""
            self.injected = {"503": 0, "403": 0, "reset": 0}
            self.requests = 0

    def handle_error(self, request, client_address) -> None:
        """A client that hung up (a reset we injected, a job killed mid-request) is not news."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def take_fault(self, target: str) -> str | None:
        with self._lock:
            self.requests += 1
            if self.deny:
                self.injected["403"] += 1
                return "403"
            if self.only_objects and self.only_objects not in target:
                return None
            if self.reset_next > 0:
                self.reset_next -= 1
                self.injected["reset"] += 1
                return "reset"
            if self.fail_next > 0:
                self.fail_next -= 1
                self.injected["503"] += 1
                return "503"
        return None


class _ProxyHandler(socketserver.StreamRequestHandler):
    server: FaultProxy

    def handle(self) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=120)
        while True:
            request_line = self.rfile.readline(65537)
            if not request_line.strip():
                return
            method, target, _ = request_line.decode("latin-1").split(" ", 2)
            headers = []
            while (line := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                name, value = line.decode("latin-1").split(":", 1)
                headers.append((name.strip(), value.strip()))
            body = self._read_body(headers)
            if self.server.latency_s:
                time.sleep(self.server.latency_s)
            fault = self.server.take_fault(target)
            if fault == "reset":
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault is not None:
                status = int(fault)
                message = b'{"error": {"code": %d, "message": "injected by the test proxy"}}' % status
                self.wfile.write(b"HTTP/1.1 %d Injected\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (status, len(message), message))
                self.wfile.flush()
                continue
            forwarded = {k: v for k, v in headers if k.lower() not in ("transfer-encoding", "connection")}
            forwarded["Content-Length"] = str(len(body))
            with self.server.upstream_slots:
                upstream.request(method, target, body=body, headers=forwarded)
                response = upstream.getresponse()
                payload = response.read()
            self.wfile.write(f"HTTP/1.1 {response.status} {response.reason}\r\n".encode("latin-1"))
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.wfile.write(f"{name}: {value}\r\n".encode("latin-1"))
            self.wfile.write(f"Content-Length: {len(payload)}\r\n\r\n".encode("latin-1") + payload)
            self.wfile.flush()

    def _read_body(self, headers: list[tuple[str, str]]) -> bytes:
        fields = {k.lower(): v for k, v in headers}
        if "content-length" in fields:
            return self.rfile.read(int(fields["content-length"]))
        if fields.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return b""


class ObjectStores:
    """The servers' ports, fixed when the test session starts, and the servers once started.

    Ports are chosen (and `client_env` exported) before any storage library is imported, because
    fsspec reads its FSSPEC_* defaults at import; `start` brings the servers up the first time a
    test needs them. Every gs:// request goes through the fault proxy, idle unless a test arms it.
    """

    def __init__(self, log_dir: pathlib.Path):
        self.log_dir = log_dir
        self.gcs_port, self.s3_port, self.proxy_port = free_port(), free_port(), free_port()
        self.proxy: FaultProxy | None = None
        self.processes: list[subprocess.Popen] = []

    def client_env(self) -> dict[str, str]:
        """Variables that point gcsfs, TensorStore and s3fs at the local servers (nobody's credentials)."""
        gcs = f"http://127.0.0.1:{self.proxy_port}"
        return {
            "STORAGE_EMULATOR_HOST": gcs,
            "TENSORSTORE_GCS_HTTP_URL": gcs,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "FSSPEC_GCS_TOKEN": "anon",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> None:
        if self.proxy is not None:
            return
        storage = self.log_dir / "gcs"
        storage.mkdir(parents=True, exist_ok=True)
        # The emulator keeps its objects on disk in its working directory.
        self.processes.append(_server([_tool("gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port",
                                       str(self.gcs_port), "-q"], self.gcs_port, "gcp-storage-emulator",
                                      self.log_dir / "gcs.log", cwd=storage))
        self.processes.append(_server([_tool("moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)],
                                      self.s3_port, "moto_server", self.log_dir / "s3.log", cwd=self.log_dir))
        self.proxy = FaultProxy(self.gcs_port, self.proxy_port)

    def new_bucket(self, scheme: str) -> str:
        """A fresh, empty bucket URL ("gs://t-..." or "s3://t-...")."""
        name = f"t-{uuid.uuid4().hex[:12]}"
        if scheme == "gs":
            from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415
            from google.cloud import storage  # noqa: PLC0415

            client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": f"http://127.0.0.1:{self.gcs_port}"})
            client.create_bucket(name)
        else:
            import boto3  # noqa: PLC0415

            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.s3_port}").create_bucket(Bucket=name)
        return f"{scheme}://{name}"

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=30)
