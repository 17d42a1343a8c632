"""Static checks of deploy/ and docker-compose.yml: each file validates against its schema (the
Compose Specification, KubeRay's CRDs, Kubernetes' own, Ray's cluster-launcher schema), the
Dockerfile passes hadolint, and every port, command and environment name in them is one the
code reads."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import shlex
import subprocess

import jsonschema
import pytest
import ray
import tyro
import yaml

from common.redis_io import RedisConfig
from launch.config import TrainConfig
from tests.deploy.compose import (
    COMPOSE_FILE,
    DOCKERFILE,
    ROOT,
    interpolate,
    load_compose,
    service_argv,
    service_env,
)
from tests.deploy.processes import BIN

KUBERAY = ROOT / "deploy" / "kuberay"
SCHEMAS = pathlib.Path(__file__).parent / "kuberay_schemas"  # from KubeRay's CRDs (SOURCE.md)
CRDS = ROOT.parent / "shared" / "data" / "kuberay"  # the CRDs themselves, where present
CLUSTER_YAML = ROOT / "deploy" / "ray-cluster.yaml"


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True)


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc]


def parse_train(argv: list[str]) -> TrainConfig:
    """`mario train …` arguments, through the real CLI parser."""
    assert argv[:2] == ["mario", "train"], argv
    return tyro.cli(TrainConfig, args=argv[2:])


# -- docker compose ------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec():
    result = run_tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec",
                      str(COMPOSE_FILE))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_run_real_commands_that_agree_on_ports_and_names():
    env = {"REDIS_PASSWORD": "pw"}
    compose = load_compose(env)
    services = compose["services"]
    assert set(services) == {"redis", "trainer", "ray-worker"}
    redis_argv = service_argv(compose, "redis")
    assert redis_argv[0] == "redis-server" and "--appendonly" in redis_argv
    redis_port = redis_argv[redis_argv.index("--port") + 1]
    assert redis_argv[redis_argv.index("--requirepass") + 1] == "pw"
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])
    trainer = parse_train(service_argv(compose, "trainer"))
    assert trainer.redis_url == f"redis://redis:{redis_port}/0"
    assert trainer.resume_existing and trainer.run_dir is not None
    worker_argv = service_argv(compose, "ray-worker")
    assert worker_argv[:2] == ["ray", "start"] and "--block" in worker_argv
    assert worker_argv[worker_argv.index("--address") + 1] == f"trainer:{trainer.ray_head_port}"
    published = services["trainer"]["ports"][0].split(":")
    assert published == [str(trainer.ray_dashboard_port)] * 2
    # The password reaches every process that talks to Redis, under the name the code reads.
    for name in ("trainer", "ray-worker"):
        assert service_env(compose, name)[RedisConfig().password_env] == "pw"
    # Ray's token: the head writes it to ~/.ray, which trainer and workers share.
    for name in ("trainer", "ray-worker"):
        assert service_env(compose, name)["RAY_AUTH_MODE"] == "token"
        assert "ray-auth:/home/mario/.ray" in services[name]["volumes"]
    # GPU for the learner
    devices = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_compose_env_names_are_ones_the_code_reads():
    compose = load_compose({})
    sources = "\n".join(p.read_text() for p in (ROOT / "common").glob("*.py"))
    ray_constants = pathlib.Path(ray.__file__).parent.joinpath("_private/ray_constants.py")
    for name in ("trainer", "ray-worker"):
        for variable in service_env(compose, name):
            if variable == "RAY_AUTH_MODE":
                continue  # Ray's own (checked in the test above)
            if variable.startswith("RAY_"):  # a setting of Ray's, under the name it reads
                assert f'"{variable}"' in ray_constants.read_text(), f"Ray reads no {variable}"
                continue
            assert f'"{variable}"' in sources, f"{name}: nothing reads {variable}"
    worker = service_env(compose, "ray-worker")
    grace = compose["services"]["ray-worker"]["stop_grace_period"]
    assert float(worker["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]) < float(grace.rstrip("s"))


def test_compose_defaults_match_the_image():
    compose = load_compose({})
    exposed = re.search(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.M)[1].split()
    trainer = parse_train(service_argv(compose, "trainer"))
    assert {str(trainer.ray_head_port), str(trainer.ray_dashboard_port)} == set(exposed)
    assert str(TrainConfig().ray_dashboard_port) in exposed  # the CLI default too
    volumes = compose["services"]["trainer"]["volumes"]
    assert "runs:/home/mario/runs" in volumes and str(trainer.run_dir).startswith("runs/")


# -- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    result = run_tool("hadolint", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_with_the_readme_setup_and_runs_mario_as_non_root():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.13-slim", text, re.M)
    assert re.search(r"^RUN .*scripts/setup$", text, re.M)  # the README's fresh-machine setup
    assert 'ENV MARIO_EXTRAS=""' in text  # the package alone, no dev tools
    assert "scripts/setup" in (ROOT / "README.md").read_text()
    assert "MARIO_EXTRAS" in (ROOT / "scripts" / "setup").read_text()
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["mario"\]$', text, re.M)
    assert "HEALTHCHECK" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"runs", ".venv", ".git"} <= set(ignored)
    # Everything the build copies exists, and the package sources are all copied.
    copied = re.findall(r"^COPY (?!--from)(\S+)", text, re.M)
    for path in copied:
        assert (ROOT / path).exists(), path
    for package in ("common/", "actors/", "learner/", "replay_server/"):
        assert package in copied


# -- KubeRay -------------------------------------------------------------------------------------


def strict(schema: dict) -> dict:
    """A CRD schema that rejects unknown fields (as the API server's strict validation does)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(file: str) -> dict:
    return strict(json.loads((SCHEMAS / file).read_text()))


@pytest.mark.skipif(not CRDS.is_dir(), reason="KubeRay's CRD files are not beside this checkout")
@pytest.mark.parametrize(
    ("crd", "vendored"),
    [("ray.io_rayclusters.yaml", "raycluster-v1.json"), ("ray.io_rayjobs.yaml", "rayjob-v1.json")],
)
def test_vendored_crd_schemas_match_the_crds(crd, vendored):
    definition = yaml.safe_load((CRDS / crd).read_text())
    version = next(v for v in definition["spec"]["versions"] if v["name"] == "v1")
    assert json.loads((SCHEMAS / vendored).read_text()) == version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize(
    ("file", "kind", "crd"),
    [("raycluster.yaml", "RayCluster", "raycluster-v1.json"),
     ("rayjob.yaml", "RayJob", "rayjob-v1.json")],
)  # fmt: skip
def test_kuberay_manifests_validate_against_kuberay_crds(file, kind, crd):
    docs = [doc for doc in manifests(file) if doc["kind"] == kind]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        jsonschema.validate(doc, crd_schema(crd))


def test_strict_crd_schema_rejects_an_unknown_field():
    doc = next(doc for doc in manifests("raycluster.yaml") if doc["kind"] == "RayCluster")
    doc["spec"]["headGroupSpec"]["rayStartParms"] = {}  # a typo
    with pytest.raises(jsonschema.ValidationError, match="rayStartParms"):
        jsonschema.validate(doc, crd_schema("raycluster-v1.json"))


def test_core_objects_validate_with_kubernetes_validate():
    files = [str(KUBERAY / "redis.yaml"), str(KUBERAY / "raycluster.yaml")]
    result = run_tool("kubernetes-validate", "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    for kind in ("Deployment", "Service", "PersistentVolumeClaim"):
        assert f"passed for resource {kind.lower()}/" in result.stdout + result.stderr


def test_kuberay_pieces_agree_on_redis_address_secret_and_command():
    redis_docs = {doc["kind"]: doc for doc in manifests("redis.yaml")}
    deployment, service = redis_docs["Deployment"], redis_docs["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][0] == "redis-server" and "--appendonly" in container["command"]
    port = int(container["command"][container["command"].index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port == service["spec"]["ports"][0]["port"]
    address = f"{service['metadata']['name']}:{port}"
    cluster = next(doc for doc in manifests("raycluster.yaml") if doc["kind"] == "RayCluster")
    fault_tolerance = cluster["spec"]["gcsFaultToleranceOptions"]
    assert fault_tolerance["redisAddress"] == address
    secret = fault_tolerance["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert secret == next(e for e in container["env"] if e["name"] == "REDIS_PASSWORD")[
        "valueFrom"]["secretKeyRef"]  # fmt: skip
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:  # every node's processes get the password under the name the code reads
        env = group["template"]["spec"]["containers"][0]["env"]
        entry = next(e for e in env if e["name"] == RedisConfig().password_env)
        assert entry["valueFrom"]["secretKeyRef"] == secret
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"]["limits"]["nvidia.com/gpu"] == 1
    stop_wait = next(e for e in head["env"] if e["name"] == "RAY_JOB_STOP_WAIT_TIME_S")
    assert int(stop_wait["value"]) >= 60  # the final checkpoint before `ray job stop`'s SIGKILL
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "1"  # the learner's
    job = manifests("rayjob.yaml")[0]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    train = parse_train(shlex.split(job["spec"]["entrypoint"]))
    assert train.redis_url == f"redis://{address}/0"
    runs_mount = next(m for m in head["volumeMounts"] if m["name"] == "runs")["mountPath"]
    assert str(train.run_dir).startswith(runs_mount + "/") and train.resume_existing


# -- ray up --------------------------------------------------------------------------------------


def test_cluster_launcher_yaml_validates_and_its_commands_agree():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    jsonschema.validate(config, json.loads(pathlib.Path(schema_path).read_text()))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 1, "GPU": 1}  # the learner's CPU and GPU
    workers = [
        t for n, t in config["available_node_types"].items() if n != config["head_node_type"]
    ]
    assert workers and all("GPU" not in t["resources"] for t in workers)
    head_commands = " ".join(config["head_start_ray_commands"])
    gcs_port = re.search(r"ray start --head --port=(\d+)", head_commands)[1]
    # `ray job stop` waits this long for the final checkpoint before its SIGKILL
    stop_wait = re.search(r"RAY_JOB_STOP_WAIT_TIME_S=(\d+) ray start --head", head_commands)
    assert stop_wait and int(stop_wait[1]) >= 60
    redis_port = re.search(r"redis-server --port (\d+)", head_commands)[1]
    assert redis_port != gcs_port
    assert f":{redis_port}/0" in head_commands  # the URL file the job reads
    assert all(f"$RAY_HEAD_IP:{gcs_port}" in c for c in config["worker_start_ray_commands"]
               if c.startswith("ray start"))  # fmt: skip
    # The README's job command for this cluster parses as `mario train`.
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"ray job submit [^\n]*-- '(mario train[^\n']*)'", readme)
    assert command, "README: no `ray job submit … -- mario train …` line"
    argv = shlex.split(interpolate(command[1].replace("$(cat ~/runs/redis_url)", "redis://h:1/0"),
                                   {}))  # fmt: skip
    parse_train(argv)
