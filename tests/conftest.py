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


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run beside Ray workers on 2 cores: one torch thread each keeps them from thrashing."""
    import torch

    torch.set_num_threads(1)
