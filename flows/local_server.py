"""A Prefect server on loopback, started and stopped around a block: for tests, benchmarks and local trials."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_prefect_server(
    home: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> Iterator[str]:
    """Run `prefect server start` on 127.0.0.1 with PREFECT_HOME=`home` (SQLite there unless `env` names another
    database) and yield its API URL once /health answers; the server's log is `home/server.log`."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = {
        **os.environ,
        **(env or {}),
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
    }
    prefect = Path(sys.executable).parent / "prefect"
    with open(home / "server.log", "wb") as log:
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Prefect server did not start; see {home / 'server.log'}")
                time.sleep(0.5)
            yield url
        finally:
            stop_process(server)


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if `process` has not exited after `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
