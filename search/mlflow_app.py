# SPDX-License-Identifier: Apache-2.0
"""The MLflow server app of ``otarena ui``: MLflow's own, opening in its model-training view.

MLflow 3.17 and 3.18's UI picks its GenAI or model-training view from a switch at its top left that
each browser remembers (``localStorage["mlflow.workflowType_v1"]``, GenAI when unset), not from the
experiment's ``mlflow.experimentKind`` tag, so a first visit lands on a traces overview. This app is
MLflow's server with one change: its page sets the remembered choice to the training view when the
browser has none yet; a choice made with the switch is kept. ``mlflow ui --app-name otarena`` serves
it (the ``mlflow.app`` entry point in pyproject.toml, MLflow's hook for custom server apps).
``tests/search/test_mlflow_ui.py`` checks the key against the UI in Chromium.
"""
from __future__ import annotations

WORKFLOW_KEY = "mlflow.workflowType_v1"
TRAINING = "machine_learning"
_SCRIPT = (f'<script>try{{localStorage.getItem("{WORKFLOW_KEY}")||'
           f'localStorage.setItem("{WORKFLOW_KEY}",JSON.stringify("{TRAINING}"))}}catch(e){{}}</script>')


def _training_view_first(response):
    """Put the script at the top of the UI's page (index.html); every other response passes unchanged."""
    if response.mimetype != "text/html" or response.status_code != 200:
        return response
    response.direct_passthrough = False  # a file response streams; read it to edit it
    page = response.get_data(as_text=True)
    if "<head>" in page and WORKFLOW_KEY not in page:
        response.set_data(page.replace("<head>", f"<head>{_SCRIPT}", 1))
    return response


def create_app():
    """MLflow's server app (ASGI under uvicorn, MLflow's default, else WSGI) with the page script added."""
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app

    app.after_request(_training_view_first)
    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app
