# SPDX-License-Identifier: Apache-2.0
"""The cluster configs: what `ray up` and `kubectl apply` would get, checked offline.

cluster.yaml (AWS) and deploy/cluster-gcp.yaml are valid Ray cluster-launcher configs by Ray's own schema
(prepare_config + validate_config, as `ray up` runs them); the KubeRay manifests have the shape KubeRay
reads; none of them opens anything to the world. deploy/start-mlflow.sh and deploy/aws-security-group.sh
run for real against fake `mlflow` and `aws` executables. Every process a test starts is stopped through
its own process group.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
LAUNCHER_CONFIGS = ["cluster.yaml", "deploy/cluster-gcp.yaml"]
KUBERAY = sorted((DEPLOY / "kuberay").glob("*.yaml"))
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"


def _load(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def _strings(obj):
    """Every string in a parsed YAML tree, keys included."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def _dependency(name: str) -> Requirement:
    """A requirement of pyproject.toml's [project] dependencies (no tomllib: Python 3.10 is supported)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S).group(1)
    return next(r for r in map(Requirement, re.findall(r'^\s*"([^"]+)"', block, re.M)) if r.name == name)


def _torch_cap() -> str:
    return next(f"torch{s}" for s in _dependency("torch").specifier if s.operator == "<=")


def _workers(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


@pytest.fixture(params=LAUNCHER_CONFIGS)
def launcher(request):
    return request.param, _load(request.param)


# ------------------------------------------------------------------------------ cluster launcher configs
def test_launcher_config_matches_ray_schema(launcher):
    _, config = launcher
    # prepare_config fills Ray's provider defaults, as `ray up` does, before the schema check.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # Our setup and start commands are the ones Ray runs, not its defaults (which install nightly wheels).
    assert prepared["head_start_ray_commands"] == config["head_start_ray_commands"]
    assert all(c in prepared["worker_setup_commands"] for c in config["setup_commands"])


def test_image_ray_matches_ours(launcher):
    _, config = launcher
    images = [config["docker"]["image"]] + [config["docker"][k] for k in ("head_image", "worker_image")
                                            if k in config["docker"]]
    assert images and all(image == IMAGE for image in images), images
    assert ray.__version__ in _dependency("ray").specifier  # the version pyproject.toml pins is this Ray


def test_head_runs_no_trials(launcher):
    _, config = launcher
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in start and "--num-cpus=0" in start
    assert "--dashboard-host=127.0.0.1" in start


def test_gpu_workers_autoscale(launcher):
    rel, config = launcher
    workers = _workers(config)
    assert len(workers) >= 2
    for name, worker in workers.items():
        assert 0 <= worker["min_workers"] <= worker["max_workers"], name
    assert 0 < sum(w["max_workers"] for w in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    spot = set()
    for name, worker in workers.items():
        node = worker["node_config"]
        if rel == "cluster.yaml":
            assert re.fullmatch(r"(g[456]\w*|p[345]\w*)\.\d*x?large", node["InstanceType"]), name  # GPU types
            assert all(d["Ebs"]["VolumeSize"] >= 100 for d in node["BlockDeviceMappings"]), name
            if node.get("InstanceMarketOptions", {}).get("MarketType") == "spot":
                spot.add(name)
        else:
            gpus = sum(a["acceleratorCount"] for a in node["guestAccelerators"])
            assert worker["resources"]["GPU"] == gpus > 0, name  # GCP does not detect resources
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", name  # GPU VMs cannot migrate
            assert {i["key"]: i["value"] for i in node["metadata"]["items"]}["install-nvidia-driver"] == "True"
            assert all(d["initializeParams"]["diskSizeGb"] >= 100 for d in node["disks"]), name
            if node["scheduling"].get("provisioningModel") == "SPOT":
                spot.add(name)
    assert spot and spot != set(workers), "one spot type and one on-demand type"


def test_nothing_is_bound_or_opened_to_the_world(launcher):
    rel, config = launcher
    assert not [s for s in _strings(config) if "0.0.0.0" in s]
    if rel == "cluster.yaml":
        # Without SecurityGroupIds on every node type, `ray up` creates a group with SSH open to 0.0.0.0/0.
        for name, node_type in config["available_node_types"].items():
            assert node_type["node_config"]["SecurityGroupIds"], name
        assert "security_group" not in config["provider"]
    else:
        # GCP: our own subnetwork (firewalled, docs/cluster.md), never Ray's pick of the default network.
        for name, node_type in config["available_node_types"].items():
            interfaces = node_type["node_config"]["networkInterfaces"]
            assert all("/subnetworks/otarena" in i["subnetwork"] for i in interfaces), name
            assert node_type["node_config"]["tags"]["items"] == ["otarena-ray"], name


def test_setup_installs_otarena_from_the_repository(launcher):
    _, config = launcher
    assert config["file_mounts"]["~/otarena"] == "."
    assert ".gitignore" in config["rsync_filter"]  # .venv, data and run outputs stay home
    install = [c for c in config["setup_commands"] if "pip install" in c]
    assert len(install) == 1
    assert "-e ~/otarena" in install[0] and f'"{_torch_cap()}"' in install[0]


def test_token_authentication_on_every_node(launcher):
    _, config = launcher
    options = " ".join(config["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in options
    token_path = re.search(r"-e RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    # file_mounts copies the local token there (in the container, ~ is /home/ray).
    mounts = {remote.replace("~/", "/home/ray/", 1): local for remote, local in config["file_mounts"].items()}
    assert mounts[token_path] == "~/.ray/auth_token"


def test_mlflow_server_starts_on_the_head_after_ray(launcher):
    rel, config = launcher
    commands = config["head_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    mlflow = [i for i, c in enumerate(commands) if "deploy/start-mlflow.sh" in c]
    assert len(mlflow) == 1 and mlflow[0] > ray_start
    argv = shlex.split(commands[mlflow[0]])
    assert argv[:2] == ["bash", "~/otarena/deploy/start-mlflow.sh"]
    assert argv[2] == ("s3://YOUR-BUCKET/mlflow" if rel == "cluster.yaml" else "gs://YOUR-BUCKET/mlflow")
    # The database outlives the container: ~/mlflow is a folder of the head's host disk.
    volume = config["docker"]["head_run_options"][0]
    assert re.fullmatch(r"--volume=/home/ubuntu/otarena-mlflow:/home/ray/mlflow", volume)
    assert "mkdir -p ~/otarena-mlflow" in config["initialization_commands"]
    # The head needs the bucket client for the artifact store.
    client = "boto3" if rel == "cluster.yaml" else "google-cloud-storage"
    assert any(client in c for c in config["head_setup_commands"])


def test_job_command_uses_shared_storage(launcher):
    rel, _ = launcher
    text = (ROOT / rel).read_text()
    scheme = "s3" if rel == "cluster.yaml" else "gs"
    assert f"--storage {scheme}://YOUR-BUCKET/ray_results" in text
    assert "--address auto" in text and "--tracking-uri http://<head private ip>:5000" in text


def test_placeholders_are_documented():
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for rel in LAUNCHER_CONFIGS:
        body = "\n".join(line.split(" #")[0] for line in (ROOT / rel).read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        placeholders = set(re.findall(r"[\w-]*YOUR-[A-Z-]*[A-Z]", body))
        assert placeholders, rel
        for placeholder in placeholders:
            assert placeholder in docs, (rel, placeholder)


# ------------------------------------------------------------------------------------- KubeRay manifests
def _kuberay_docs() -> list[dict]:
    return [doc for path in KUBERAY for doc in yaml.safe_load_all(path.read_text()) if doc]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for doc in _kuberay_docs():
        if doc["kind"] == "RayCluster":
            specs.append((doc["metadata"]["name"], doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((doc["metadata"]["name"], doc["spec"]["rayClusterSpec"]))
    return specs


def _head_service(name: str, spec: dict) -> str:
    custom = spec["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name")
    return custom or f"{name}-head-svc"  # KubeRay's default for a RayCluster


def test_kuberay_manifests_kinds():
    kinds = {(d["apiVersion"], d["kind"]) for d in _kuberay_docs()}
    assert kinds == {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("v1", "PersistentVolumeClaim")}
    assert len(_ray_cluster_specs()) == 2


@pytest.mark.parametrize("name, spec", _ray_cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_cluster_spec(name, spec):
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pod = head["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    ray_head = pod["containers"][0]  # KubeRay's Ray container is the first; the head Service takes its ports
    assert 5000 in [p["containerPort"] for p in ray_head["ports"]]
    images = [c["image"] for c in pod["containers"]]
    # MLflow beside the head, on its own ReadWriteOnce volume, artifacts proxied to /shared.
    mlflow = containers["mlflow"]
    args = dict(a.removeprefix("--").split("=", 1) for a in mlflow["args"] if "=" in a)
    assert mlflow["command"] == ["mlflow"] and mlflow["args"][0] == "server" and "--serve-artifacts" in mlflow["args"]
    assert args["port"] == "5000" and args["backend-store-uri"] == "sqlite:////mlflow-db/mlflow.db"
    assert args["artifacts-destination"].startswith("/shared/")
    assert args["allowed-hosts"].split(",")[0] == f"{_head_service(name, spec)}:5000"
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert volumes == {"shared": "otarena-shared", "mlflow-db": "otarena-mlflow-db"}
    assert {"name": "shared", "mountPath": "/shared"} in ray_head["volumeMounts"]
    # GPU workers, autoscaled, one GPU per pod, /shared mounted.
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] > 0
        worker_pod = group["template"]["spec"]
        for container in worker_pod["containers"]:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
            images.append(container["image"])
        assert worker_pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "otarena-shared"}}]
    # Every Ray container runs the image deploy/Dockerfile builds on this Ray.
    assert all(f"ray{ray.__version__}-py311-gpu" in image for image in images), images


def test_kuberay_exposes_nothing_outside_the_cluster():
    for doc in _kuberay_docs():
        for spec in ([doc["spec"]] if doc["kind"] == "RayCluster" else
                     [doc["spec"]["rayClusterSpec"]] if doc["kind"] == "RayJob" else []):
            head = spec["headGroupSpec"]
            assert head["serviceType"] == "ClusterIP"
            assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
            assert "enableIngress" not in head
        text = json.dumps(doc)
        for forbidden in ("LoadBalancer", "NodePort", "hostNetwork", "hostPort", "Ingress\""):
            assert forbidden not in text, (doc["metadata"]["name"], forbidden)


def test_kuberay_shared_storage():
    claims = {d["metadata"]["name"]: d["spec"] for d in _kuberay_docs() if d["kind"] == "PersistentVolumeClaim"}
    assert claims["otarena-shared"]["accessModes"] == ["ReadWriteMany"]  # every node reads and writes /shared
    assert claims["otarena-mlflow-db"]["accessModes"] == ["ReadWriteOnce"]  # sqlite: one writer, never NFS


def test_rayjob_runs_the_search():
    job = next(d for d in _kuberay_docs() if d["kind"] == "RayJob")
    spec = job["spec"]
    # KubeRay pastes the entrypoint into the submitter's shell command: one plain command, no operators.
    assert not re.search(r"&&|\|\||[;|`]|\$\(", spec["entrypoint"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["otarena", "search"]
    config = argv[2]
    assert config.endswith("configs/cifar10-preact.yaml")
    assert (ROOT / config.removeprefix("/home/ray/otarena/")).is_file()  # the image's copy of the repository
    options = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert options["--address"] == "auto"
    assert options["--tracking-uri"] == f"http://{_head_service(job['metadata']['name'], spec['rayClusterSpec'])}:5000"
    assert options["--storage"].startswith("/shared/")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0


def test_dockerfile_builds_on_our_ray():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(IMAGE)}$", dockerfile, re.M)
    install = next(line for line in dockerfile.splitlines() if line.startswith("RUN pip install"))
    assert f'"{_torch_cap()}"' in install and "-e /home/ray/otarena" in install
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "data", "mlruns", "ray_results"} <= set(ignored)


# ------------------------------------------------------------------------------------ deploy/*.sh scripts
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


FAKE_MLFLOW = """#!{python}
# A stand-in for `mlflow server`: records its arguments, answers /health on --host:--port.
import http.server, json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_MLFLOW_ARGV"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_MLFLOW_FAIL"):
    print("fake mlflow: cannot open the database", file=sys.stderr)
    sys.exit(1)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")
    def log_message(self, *args):
        pass
http.server.HTTPServer((args[args.index("--host") + 1], int(args[args.index("--port") + 1])), Health).serve_forever()
"""


@pytest.fixture
def fake_mlflow(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "mlflow", FAKE_MLFLOW.format(python=sys.executable))
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
           "FAKE_MLFLOW_ARGV": str(tmp_path / "argv.jsonl"), "MLFLOW_HOME": str(tmp_path / "home"),
           "MLFLOW_PORT": str(_free_port())}
    env.pop("MLFLOW_HOST", None)
    groups = []
    yield tmp_path, env, groups
    pidfile = tmp_path / "home" / "server.pid"
    if pidfile.is_file() and pidfile.read_text().strip():
        groups.append(int(pidfile.read_text()))
    for pgid in groups:  # only the sessions start-mlflow.sh started for this test
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_mlflow(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEPLOY / "start-mlflow.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_start_mlflow_binds_the_private_ip_and_restarts(fake_mlflow):
    tmp, env, groups = fake_mlflow
    home, port = tmp / "home", env["MLFLOW_PORT"]
    done = _start_mlflow(env, "s3://YOUR-BUCKET/mlflow")
    assert done.returncode == 0, done.stderr
    first = int((home / "server.pid").read_text())
    groups.append(first)
    host = ray.util.get_node_ip_address()  # the address Ray advertises for this node: its private IP on a cloud
    uri = f"http://{host}:{port}"
    assert f"MLflow tracking server at {uri}" in done.stdout
    assert (home / "tracking_uri").read_text().strip() == uri
    assert urllib.request.urlopen(f"{uri}/health", timeout=5).status == 200
    argv = json.loads((tmp / "argv.jsonl").read_text().splitlines()[0])
    assert argv == ["server", "--host", host, "--port", port, "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
                    "--artifacts-destination", "s3://YOUR-BUCKET/mlflow", "--serve-artifacts",
                    "--allowed-hosts", f"{host}:{port},127.0.0.1:*,localhost:*"]
    assert _group_alive(first)
    # Every `ray up` runs it again: the old server (its whole process group) goes, a new one answers.
    again = _start_mlflow(env, "s3://YOUR-BUCKET/mlflow", "postgresql://u:p@db:5432/mlflow")
    assert again.returncode == 0, again.stderr
    second = int((home / "server.pid").read_text())
    groups.append(second)
    assert second != first and not _group_alive(first) and _group_alive(second)
    assert json.loads((tmp / "argv.jsonl").read_text().splitlines()[1])[5:7] == [
        "--backend-store-uri", "postgresql://u:p@db:5432/mlflow"]
    assert urllib.request.urlopen(f"{uri}/health", timeout=5).status == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_start_mlflow_refuses_every_interface(fake_mlflow, host):
    tmp, env, _ = fake_mlflow
    done = _start_mlflow({**env, "MLFLOW_HOST": host}, "s3://YOUR-BUCKET/mlflow")
    assert done.returncode == 2 and "refusing to bind" in done.stderr
    assert not (tmp / "argv.jsonl").exists()


def test_start_mlflow_reports_a_server_that_dies(fake_mlflow):
    tmp, env, groups = fake_mlflow
    started = time.time()
    done = _start_mlflow({**env, "MLFLOW_HOST": "127.0.0.1", "FAKE_MLFLOW_FAIL": "1"}, "/tmp/artifacts")
    assert done.returncode == 1 and "cannot open the database" in done.stderr
    assert time.time() - started < 30  # it notices the exit instead of polling for 180 s


FAKE_AWS = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_AWS_LOG"
case "$2" in
  describe-vpcs) echo vpc-0a1b2c ;;
  create-security-group) echo sg-0123456789 ;;
esac
"""


@pytest.fixture
def fake_aws(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "aws", FAKE_AWS)
    return tmp_path / "aws.log", {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin",
                                  "FAKE_AWS_LOG": str(tmp_path / "aws.log")}


def test_security_group_admits_the_cluster_and_ssh_from_one_range(fake_aws):
    log, env = fake_aws
    done = subprocess.run(["bash", str(DEPLOY / "aws-security-group.sh"), "203.0.113.7/32", "eu-west-1"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sg-0123456789"
    calls = log.read_text().splitlines()
    assert calls[0].startswith("ec2 describe-vpcs --region eu-west-1")
    assert calls[1].startswith("ec2 create-security-group --region eu-west-1 --vpc-id vpc-0a1b2c")
    rules = calls[2]
    assert rules.startswith("ec2 authorize-security-group-ingress --region eu-west-1 --group-id sg-0123456789")
    assert "IpProtocol=-1,UserIdGroupPairs=[{GroupId=sg-0123456789," in rules  # the cluster's own nodes
    assert "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=203.0.113.7/32," in rules  # SSH, one range
    assert len(calls) == 3 and "0.0.0.0" not in log.read_text()


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "my-laptop", "203.0.113.7"])
def test_security_group_refuses_the_world_and_nonsense(fake_aws, cidr):
    log, env = fake_aws
    done = subprocess.run(["bash", str(DEPLOY / "aws-security-group.sh"), cidr], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2, done.stdout
    assert not log.exists()  # refused before any AWS call


def test_scripts_are_executable():
    for script in ("start-mlflow.sh", "aws-security-group.sh"):
        assert os.access(DEPLOY / script, os.X_OK), script


# ------------------------------------------------------------------------------------------------- docs
def test_docs_show_the_commands():
    docs = (ROOT / "docs" / "cluster.md").read_text()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run on a cluster"):]
    section = section[:section.index("\n## ", 1)]
    for text in (docs, section):
        for command in ("ray up cluster.yaml", "ray dashboard cluster.yaml",
                        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
                        "otarena search configs/cifar10-preact.yaml --address auto",
                        "--storage s3://YOUR-BUCKET/ray_results",
                        "otarena leaderboard --tracking-uri http://127.0.0.1:5000 --out site",
                        "ray down cluster.yaml", "kubectl apply -f deploy/kuberay/",
                        "kubectl port-forward svc/otarena-head-svc 8265:8265 5000:5000", "--app-name basic-auth"):
            assert command in text, command
