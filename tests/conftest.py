# SPDX-License-Identifier: Apache-2.0
import os

import pytest

# Keep Ray, MLflow and torch from fighting over the CI machine's 2 cores and from phoning home.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray cluster for every test that needs one."""
    import ray

    from otarena.search.run import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium (``scripts/ensure-test-tools.sh``, run by ``make test``), driven by the playwright
    package of the dev extras, which never downloads a browser: the browser of the HTML tests."""
    from pathlib import Path

    executable = Path("/usr/bin/chromium")
    if not executable.exists():
        pytest.fail("Debian's chromium is missing: run scripts/ensure-test-tools.sh (make test does)")
    from playwright import sync_api as playwright  # a dev dependency: never skipped
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run beside Ray workers on 2 cores: one torch thread each keeps them from thrashing."""
    import torch

    torch.set_num_threads(1)
