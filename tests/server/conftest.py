"""A real server process per test module: `python -m radixserve.launch_server` on a free port.

A module sets `SERVER_ARGS` for extra flags. The fixture waits for /health (the engine starts before the port
opens), and stops the server with SIGTERM at the end of the module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest

START_TIMEOUT = 180.0  # the engine takes ~15-20 s on 2 cores, more when other tests share them
# A small KV pool starts faster and is plenty for these tests.
BASE_ARGS = ("--max-total-tokens", "16384")
# NOTE: on a 2-core machine shared with other processes (pytest itself, other test runs), torch's two
# intra-op threads in the worker thrash: decoding measured 10-15x slower than with one thread.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log_path: str) -> None:
        self.proc = proc
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def launch_server(*args: str) -> Iterator[Server]:
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="radixserve-server-", suffix=".log")
    cmd = [sys.executable, "-m", "radixserve.launch_server", "--port", str(port), *BASE_ARGS, *args]
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **SERVER_ENV})
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not answer /health in {START_TIMEOUT} s:\n{server.log()[-4000:]}"
                )
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.unlink(log_path)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with launch_server(*getattr(request.module, "SERVER_ARGS", ())) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model(http: httpx.Client) -> str:
    """The served model id, as /v1/models lists it."""
    return http.get("/v1/models").json()["data"][0]["id"]
