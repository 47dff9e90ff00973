# SPDX-License-Identifier: Apache-2.0
"""An outage is told from a rejected request by the HTTP status, never by a number in the text.

Real HTTP on loopback: a tiny server answers every MLflow REST call with one fixed status, the way
a proxy in front of a restarting tracking server (503) or a live server that rejects a request (404)
answers. A run id that contains "503" must not make "run not found" look like an outage.
"""
from __future__ import annotations

import http.server
import json
import threading
import time
from contextlib import contextmanager

import pytest
from mlflow.exceptions import MlflowException

from otarena.search.tracking import ResilientClient, TrackingError, _is_outage

RUN_ID = "0a1b2c3d4e5f4503a1b2c3d4e5f50300"


@contextmanager
def _answering(status: int, body: str, content_type: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            payload = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_run_not_found_for_an_id_with_503_is_raised_at_once():
    not_found = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Run '{RUN_ID}' not found"})
    with _answering(404, not_found, "application/json") as uri:
        client = ResilientClient(uri, timeout_s=900, say=lambda line: None)
        started = time.time()
        with pytest.raises(MlflowException, match="not found") as raised:
            client.get_run(RUN_ID)
        assert time.time() - started < 60
        assert not _is_outage(raised.value)
        # A failing write is not buffered behind an outage that is not there: it raises, and
        # nothing is left blocking the writes that follow.
        with pytest.raises(MlflowException, match="not found"):
            client.set_terminated(RUN_ID, "FINISHED")
        assert client.pending == [] and client.outage_started is None


def test_a_503_from_the_server_is_an_outage():
    with _answering(503, "Service Unavailable", "text/plain") as uri:
        client = ResilientClient(uri, timeout_s=1, say=lambda line: None)
        client.set_terminated(RUN_ID, "FINISHED")  # buffered, not raised
        assert len(client.pending) == 1 and client.outage_started is not None
        with pytest.raises(TrackingError, match="unreachable"):
            client.get_run(RUN_ID)


def test_a_refused_connection_is_an_outage_and_a_bare_number_is_not():
    assert _is_outage(ConnectionRefusedError("[Errno 111] Connection refused"))
    assert not _is_outage(MlflowException(f"Run '{RUN_ID}' not found", error_code="RESOURCE_DOES_NOT_EXIST"))
    assert not _is_outage(ValueError(f"artifact path /runs/{RUN_ID}/502/504 is missing"))
