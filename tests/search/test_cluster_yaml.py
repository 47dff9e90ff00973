# SPDX-License-Identifier: Apache-2.0
"""cluster.yaml is a valid Ray cluster-launcher config (checked against Ray's own schema)."""
import pathlib

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cluster_yaml_matches_ray_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # prepare_config fills Ray's provider defaults, as `ray up` does, before the schema check.
    validate_config(prepare_config(config))
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] <= workers["max_workers"] <= config["max_workers"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("pip install" in c and "otarena" in c for c in config["setup_commands"])
    # Nothing is exposed: the dashboard binds to loopback on the head.
    assert all("0.0.0.0" not in c for c in config["head_start_ray_commands"])
