"""Test helpers: run the real `smg` command, talk HTTP to it, wait for conditions."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import orjson

DEFAULT_TIMEOUT = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # conditions may raise while the system settles
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}" +
                         (f" (last error: {last_exc!r})" if last_exc else ""))


class Resp:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<Resp {self.status} {self.body[:200]!r}>"


def request(port: int, method: str, path: str, body: Any = None, headers: Optional[dict] = None,
            timeout: float = 10.0, host: str = "127.0.0.1") -> Resp:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        hdrs = {"content-type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def post_raw(path: str, body: bytes, extra: bytes = b"", version: str = "1.1") -> bytes:
    """The bytes of a POST request with a Content-Length body."""
    return (b"POST %s HTTP/%s\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (path.encode(), version.encode(), len(body), extra)) + body


def read_until_close(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes; return everything received until the server closes
    the connection (or `timeout`)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)
    finally:
        s.close()


class GatewayProcess:
    """The real `smg` command in a subprocess, on free ports."""

    def __init__(self, args: list[str], env: Optional[dict] = None, port: Optional[int] = None,
                 subcommand: Optional[str] = None, prefix: Optional[list[str]] = None):
        """prefix: a command smg runs under (e.g. prlimit --nofile=200:200)."""
        self.base_args = list(args)
        self.prefix = list(prefix or [])
        self.subcommand = subcommand
        self.fixed_port = port
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.log_file = tempfile.NamedTemporaryFile(prefix="smg-test-", suffix=".log", delete=False)
        self._spawn()

    def _spawn(self) -> None:
        # a port found free may be taken before smg binds it (an ephemeral port
        # of some connection): wait_live() then starts over on other ports
        self.port = self.fixed_port or free_port()
        self.metrics_port = free_port()
        self.args = ([self.subcommand] if self.subcommand else []) + [
            "--host", "127.0.0.1", "--port", str(self.port), "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(self.metrics_port), *self.base_args]
        self.log_file.seek(0)
        self.log_file.truncate()
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "smg", *self.args], stdout=self.log_file,
                                     stderr=subprocess.STDOUT, env=self.env)

    def wait_live(self, timeout: float = DEFAULT_TIMEOUT) -> "GatewayProcess":
        attempts = 3

        def live():
            nonlocal attempts
            if self.proc.poll() is not None:
                if "address already in use" in self.logs().lower() and attempts > 1:
                    attempts -= 1
                    self._spawn()
                    return False
                raise AssertionError(f"smg exited with {self.proc.returncode}:\n{self.logs()}")
            return request(self.port, "GET", "/liveness", timeout=1).status == 200

        wait_for(live, timeout, message="gateway liveness")
        return self

    def wait_ready_workers(self, n: int, timeout: float = DEFAULT_TIMEOUT, worker_type: str = None) -> list:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"smg exited with {self.proc.returncode}:\n{self.logs()}")
            ws = self.workers()
            ws = [w for w in ws if w["status"] == "ready" and (worker_type is None or w["worker_type"] == worker_type)]
            return ws if len(ws) >= n else None

        return wait_for(ready, timeout, message=f"{n} ready workers")

    def workers(self, headers: Optional[dict] = None) -> list[dict]:
        return request(self.port, "GET", "/workers", headers=headers).json()["workers"]

    def metrics(self) -> str:
        return request(self.metrics_port, "GET", "/metrics").body.decode()

    def logs(self) -> str:
        with open(self.log_file.name, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def post(self, path: str, body: Any, headers: Optional[dict] = None, timeout: float = 10.0) -> Resp:
        return request(self.port, "POST", path, body, headers, timeout)

    def get(self, path: str, headers: Optional[dict] = None, timeout: float = 10.0) -> Resp:
        return request(self.port, "GET", path, None, headers, timeout)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()
        return self.proc.returncode

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        try:
            os.unlink(self.log_file.name)
        except OSError:
            pass


def run_cli(args: list[str], timeout: float = 20.0, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "smg", *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env)
