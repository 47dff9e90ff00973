# SPDX-License-Identifier: Apache-2.0
"""`otarena ui` serves the MLflow UI for a store, on loopback only, in MLflow's model-training view.

One server for the module, on a store written by otarena's own ``Tracker``: a search parent run and a
trial with three epochs of curves and the final evaluation's one-number metrics. Chromium (the
``chromium`` fixture of tests/conftest.py) opens the plain address, as a first visit does, and the
run's metrics tab; both pages are kept as screenshots under ``test-artifacts/``.
"""
import re
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from processes import BIN, free_port, http_ok, start, stop, wait_for

from otarena.search.tracking import Tracker

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 3
TEST_METRICS = {  # what an evaluated trial holds (docs/mlflow-schema.md): 19 one-number charts
    **{f"test/{m}": 0.8 for m in ("clean_acc", "pgd_acc", "aa_acc")}, "test/n_ex": 200,
    **{f"test/{m}_ci_{end}": 0.7 for m in ("clean_acc", "pgd_acc", "aa_acc") for end in ("low", "high")},
    **{f"test/aa/{a}": 0.6 for a in ("apgd-ce", "apgd-t", "fab-t", "square")}, "test/aa_blackbox_only": 0.0,
    **{f"test/pgd_check/{a}": 0.6 for a in ("pgd-10", "pgd-50", "pgd-100")}}


def _addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return []
    return [a for a in out.split() if "." in a and not a.startswith("127.")]


def _store(tmp: Path) -> SimpleNamespace:
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "ui-check")
    parent = tracker.start_search("pgd_at-search", {"otarena.method": "pgd_at"}, {"config.budget.trials": 1})
    trial = tracker.trial_run(parent, "t1", name="pgd_at-t1", tags={"otarena.method": "pgd_at"}, params={"lr": 0.002})
    for epoch in range(1, EPOCHS + 1):
        tracker.log_epoch(trial, {"train/loss": 2.0 / epoch, "val/clean_acc": 0.3 * epoch, "val/pgd_acc": 0.2 * epoch,
                                  "val/best_pgd_acc": 0.2 * epoch, "val/best_clean_acc": 0.3 * epoch,
                                  "val/best_epoch": epoch, "time/epoch_s": 1.5, "training_iteration": epoch},
                          step=epoch)
    tracker.log_metrics(trial, {**TEST_METRICS, "train/epochs": EPOCHS})
    tracker.finish(trial)
    tracker.finish(parent)
    return SimpleNamespace(experiment_id=tracker.experiment_id, trial=trial)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ui")
    store, port = _store(tmp), free_port()
    proc = start([str(BIN / "otarena"), "ui", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--port", str(port)],
                 tmp / "ui.log", cwd=tmp)
    try:
        wait_for(lambda: proc.poll() is None and http_ok(f"http://127.0.0.1:{port}/health"), "the MLflow UI",
                 timeout=240)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, log=tmp / "ui.log", **vars(store))
    finally:
        stop(proc)


def test_ui_serves_the_store_on_loopback(ui):
    import urllib.request

    search = f"{ui.url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check"
    assert b"ui-check" in urllib.request.urlopen(search, timeout=10).read()
    assert f"{ui.url}/#/experiments?workflowType=machine_learning" in ui.log.read_text()  # the address it prints
    for address in _addresses():
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((address, ui.port)) != 0, f"the UI is reachable on {address}"


def _sections(page) -> list[str]:
    """The chart sections of a run's metrics tab, top to bottom: each title line is followed by ``(n)``."""
    lines = [line.strip() for line in page.locator("main").inner_text().splitlines() if line.strip()]
    return [name for name, count in zip(lines, lines[1:]) if re.fullmatch(r"\(\d+\)", count)]


def test_a_first_visit_opens_the_training_view_with_curves_first(ui, chromium):
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})  # a fresh profile: nothing remembered
    try:
        page.goto(f"{ui.url}/")  # the plain address, not the one with ?workflowType
        page.get_by_role("link", name="ui-check").first.click()
        # The experiment opens on its runs table (model training), not on a GenAI traces overview.
        page.wait_for_url(re.compile(rf"#/experiments/{ui.experiment_id}/runs\?.*workflowType=machine_learning"),
                          timeout=60_000)
        page.get_by_text("pgd_at-search").first.wait_for(timeout=60_000)
        assert page.get_by_text("Evaluation runs").count() == 0 and page.get_by_text("Token Usage").count() == 0
        page.screenshot(path=str(artifacts / "mlflow-ui-experiment.png"))

        page.goto(f"{ui.url}/#/experiments/{ui.experiment_id}/runs/{ui.trial}/model-metrics")
        page.get_by_text("epoch/train").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1000)  # every section title rendered
        sections = _sections(page)
        curves = [s for s in sections if s.startswith("epoch/")]
        one_number = [s for s in sections if s.startswith("test")]
        assert curves == ["epoch/time", "epoch/train", "epoch/val"], sections
        assert one_number and sections.index(one_number[0]) > sections.index(curves[-1]), sections
        page.screenshot(path=str(artifacts / "mlflow-ui-run-metrics.png"))
    finally:
        page.close()
    for name in ("mlflow-ui-experiment.png", "mlflow-ui-run-metrics.png"):
        assert (artifacts / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
