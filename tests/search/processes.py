# SPDX-License-Identifier: Apache-2.0
"""Real server processes for tests: started in their own session, stopped through their own pid."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    # A session of its own: the process group holds everything it spawns, so one kill stops all.
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                            cwd=cwd, start_new_session=True)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_for(check, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f}s")


def http_ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def mlflow_server(tmp: Path, port: int, log_name: str = "mlflow.log", env: dict | None = None) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend and an artifact folder under ``tmp``; waits for /health."""
    server = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                    "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db", "--artifacts-destination",
                    str(tmp / "artifacts")], tmp / log_name, env)
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health"), "mlflow server", timeout=180)
    except TimeoutError:
        stop(server)
        raise
    return server


def count_rows(db: Path, table: str, key: str) -> int:
    """Rows of an MLflow sqlite ``table`` (metrics, tags) with ``key``, read while a driver writes the store."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute(f"select count(*) from {table} where key = ?", (key,)).fetchone()[0]
    except sqlite3.Error:
        return 0
