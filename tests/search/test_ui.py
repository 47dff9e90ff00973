# SPDX-License-Identifier: Apache-2.0
"""`otarena ui` serves the MLflow UI for a store, on loopback only."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from mlflow import MlflowClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return []
    return [a for a in out.split() if "." in a and not a.startswith("127.")]


def test_ui_serves_the_store_on_loopback(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("ui-check")
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "otarena")
    proc = subprocess.Popen([exe, "ui", "--tracking-uri", uri, "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, body = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        assert body is not None, "the MLflow UI did not answer on 127.0.0.1"
        search = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check")
        assert b"ui-check" in urllib.request.urlopen(search, timeout=10).read()
        for address in _addresses():
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((address, port)) != 0, f"the UI is reachable on {address}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
