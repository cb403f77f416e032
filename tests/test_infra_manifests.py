"""infra/: the YAML, the cluster launcher configs and the image are valid for what reads them.

- YAML under infra/ and configs/ parses and passes yamllint (.yamllint at the root).
- The cluster launcher YAMLs pass Ray's own config validation (ray-schema.json).
- The Dockerfile passes hadolint; its pins satisfy pyproject.toml.
Each validator is also shown a broken file, so a validator that accepts
anything would fail here. The Kubernetes manifests are checked in test_infra_k8s.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import tomllib
import yaml
from infra_helpers import IMAGE, INFRA, REPO_ROOT, documents
from packaging.requirements import Requirement
from packaging.version import Version

CLUSTER = INFRA / "cluster"
DOCKER = INFRA / "docker"
VENV_BIN = Path(sys.executable).parent

YAML_FILES = sorted(p for folder in (INFRA, REPO_ROOT / "configs") for p in folder.rglob("*.y*ml"))


# --- YAML ---------------------------------------------------------------------------

def test_yaml_files_exist_where_expected():
    names = {p.relative_to(REPO_ROOT).as_posix() for p in YAML_FILES}
    for expected in ("infra/k8s/raycluster.yaml", "infra/k8s/rayjob-train.yaml", "infra/k8s/rayjob-sweep.yaml",
                     "infra/k8s/mlflow.yaml", "infra/k8s/postgres.yaml", "infra/cluster/aws.yaml",
                     "infra/cluster/gcp.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_yaml_parses(path):
    assert documents(path), f"{path} holds no document"


def test_yaml_passes_yamllint():
    result = subprocess.run([str(VENV_BIN / "yamllint"), "--strict", "--config-file", str(REPO_ROOT / ".yamllint"),
                             *map(str, YAML_FILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_catches_a_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("key: value\nkey: again\nlist:\n   - wrongly: indented\n")
    result = subprocess.run([str(VENV_BIN / "yamllint"), "--strict", "--config-file", str(REPO_ROOT / ".yamllint"),
                             str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "duplication of key" in result.stdout


# --- Ray cluster launcher ------------------------------------------------------------

LAUNCHER_FILES = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_cluster_launcher_config_passes_rays_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(copy.deepcopy(config))
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before it calls the cloud


def test_rays_schema_rejects_a_broken_launcher_config():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["gpu-train"]["max_worker"] = 8  # misspelled
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_cluster_launcher_node_types(path):
    config = yaml.safe_load(path.read_text())
    docker = config["docker"]
    assert docker["image"] == IMAGE and docker["container_name"]
    assert any(o.startswith("--shm-size") for o in docker["head_run_options"])
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert "GPU" not in types["cpu-preprocess"]["resources"] and types["gpu-train"]["resources"]["GPU"] == 8
    # Node roles: a training-worker slot per GPU, and none on the preprocessing nodes.
    assert types["gpu-train"]["resources"]["trainer"] == 8 and "trainer" not in types["cpu-preprocess"]["resources"]
    for name in ("cpu-preprocess", "gpu-train"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= config["max_workers"]
        assert any(o.startswith("--shm-size") for o in types[name]["docker"]["worker_run_options"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert sum("RAY_AUTH_MODE=token" in cmd and "ray start" in cmd for cmd in starts) == 2
    assert any("--dashboard-host=127.0.0.1" in cmd for cmd in config["head_start_ray_commands"])
    assert any("import clip_ray" in cmd for cmd in config["setup_commands"])
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]


MLFLOW_HOST_FLAG = re.compile(r"--host[= ]+(\S+)")
WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", "*", "0", ""}


def mlflow_server_hosts(config: dict) -> list[str]:
    """The --host of every `mlflow server` the launcher config starts, quotes stripped; None where none is given."""
    commands = [cmd for key, cmds in config.items() if key.endswith("_commands") for cmd in cmds or []]
    servers = [cmd.split("mlflow server", 1)[1] for cmd in commands if "mlflow server" in cmd]
    return [match.group(1).strip("'\"") if (match := MLFLOW_HOST_FLAG.search(server)) else None for server in servers]


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_mlflow_server_binds_no_wildcard_address(path):
    # MLflow has no login here: a wildcard bind would serve every run to anyone who can reach the head.
    config = yaml.safe_load(path.read_text())
    hosts = mlflow_server_hosts(config)
    assert hosts, f"{path.name} starts no `mlflow server`"
    for host in hosts:
        assert host is not None, f"{path.name}: `mlflow server` without an explicit --host"
        assert host not in WILDCARD_HOSTS, f"{path.name}: `mlflow server --host {host}` listens on every interface"
    # rank 0 logs from a worker node, so the server is on an address the workers' tracking URI names
    assert hosts == ['$HEAD_IP']
    assert any("MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in cmd for cmd in config["worker_start_ray_commands"])
    wildcard = copy.deepcopy(config)
    wildcard["head_start_ray_commands"] = [cmd.replace('--host "$HEAD_IP"', "--host 0.0.0.0")
                                           for cmd in config["head_start_ray_commands"]]
    assert mlflow_server_hosts(wildcard) == ["0.0.0.0"]


def test_aws_and_gcp_share_everything_but_the_machines():
    aws, gcp = (yaml.safe_load(p.read_text()) for p in LAUNCHER_FILES)
    for key in ("docker", "file_mounts", "initialization_commands", "setup_commands", "head_setup_commands",
                "worker_start_ray_commands", "max_workers", "idle_timeout_minutes", "auth"):
        assert aws[key] == gcp[key], key
    assert [c.replace("s3://", "gs://") for c in aws["head_start_ray_commands"]] == gcp["head_start_ray_commands"]
    for name, node_type in aws["available_node_types"].items():
        other = gcp["available_node_types"][name]
        assert (node_type["resources"], node_type.get("docker")) == (other["resources"], other.get("docker"))


# --- the image ------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    result = subprocess.run([str(VENV_BIN / "hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install torch\n")
    result = subprocess.run([str(VENV_BIN / "hadolint"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


def test_dockerfile_pins_its_base_and_runs_as_a_user():
    text = (DOCKER / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG CUDA_BASE=(\S+)$", text, re.M)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+", base)
    assert ":latest" not in text
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] != "root" and not users[-1].startswith("0")
    assert re.search(r"pip install .*-r /build/requirements\.txt", text)
    assert re.search(r"pip install .*--no-deps /app", text), "the project itself"


def pins() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (DOCKER / "requirements.txt").read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line]
    for requirement in requirements:
        (spec,) = requirement.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"{requirement} is not pinned"
    return {requirement.name.lower(): requirement for requirement in requirements}


def test_image_pins_satisfy_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for line in project["dependencies"]:
        wanted = Requirement(line)
        assert wanted.name.lower() in pinned, f"{wanted.name} is not pinned in infra/docker/requirements.txt"
        pin = pinned[wanted.name.lower()]
        version = Version(next(iter(pin.specifier)).version)
        assert wanted.specifier.contains(version, prereleases=True), f"{pin} does not satisfy {wanted}"
        assert pin.extras == wanted.extras, f"{pin}: extras differ from pyproject.toml's {wanted}"


def test_images_are_tagged_never_latest():
    def images(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from [value] if key in ("image", "head_image", "worker_image") else images(value)
        elif isinstance(node, list):
            for value in node:
                yield from images(value)

    found = [image for path in YAML_FILES if INFRA in path.parents for doc in documents(path) for image in images(doc)]
    assert len(found) >= 10
    for image in found:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image


def test_clip_assets_script_extracts_merges_and_imagenet_names(tmp_path):
    """The image's /opt/clip-ray files, from a wheel-shaped zip of the installed OpenCLIP."""
    spec = importlib.util.find_spec("open_clip")  # located, not imported (that would import torch)
    if spec is None:
        pytest.skip("open-clip-torch (the bench extra) is not installed")
    package = Path(spec.origin).parent
    wheel = tmp_path / "open_clip_torch-3.3.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ("bpe_simple_vocab_16e6.txt.gz", "zero_shot_metadata.py"):
            archive.write(package / name, f"open_clip/{name}")
    out = tmp_path / "opt-clip-ray"
    subprocess.run([sys.executable, str(DOCKER / "clip_assets.py"), str(wheel), str(out)], check=True)
    names = (out / "imagenet_classnames.txt").read_text().splitlines()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert (out / "bpe_simple_vocab_16e6.txt.gz").read_bytes() == (package / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    for config in ("vit-b32-cluster.yaml", "rn50-cluster.yaml"):
        data = yaml.safe_load((REPO_ROOT / "configs" / config).read_text())
        assert Path(data["data"]["tokenizer"]).name in {p.name for p in out.iterdir()}
        assert Path(data["eval"]["zeroshot_class_names"]).name in {p.name for p in out.iterdir()}
