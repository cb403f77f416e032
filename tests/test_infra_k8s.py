"""infra/k8s: every Kubernetes manifest is valid for the system that will read it, and says what the docs claim.

- RayCluster/RayJob validate against KubeRay's CRDs (../shared/schemas), strictly:
  an unknown field fails, as it does with `kubectl apply --validate=strict`.
- Built-in Kubernetes objects, and the Ray pod templates, validate against the
  Kubernetes API schemas that kubernetes-validate ships (offline).
Each validator is also shown a broken manifest, so a validator that accepts
anything would fail here. The YAML itself, the cluster launcher and the image
are checked in test_infra_manifests.py.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from infra_helpers import IMAGE, INFRA, REPO_ROOT, documents

K8S = INFRA / "k8s"
KUBERNETES_VERSION = "1.33.0"


def k8s_objects() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in documents(path)]


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_objects() if doc["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the RayCluster's own and each RayJob's rayClusterSpec."""
    return ([(doc["metadata"]["name"], doc["spec"]) for doc in of_kind("RayCluster")]
            + [(doc["metadata"]["name"], doc["spec"]["rayClusterSpec"]) for doc in of_kind("RayJob")])


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, group["template"]) for name, group in groups]


# --- KubeRay custom resources ------------------------------------------------------

def strict(schema):
    """The CRD schema with unknown fields forbidden wherever the schema lists the known ones."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators(kuberay_schemas_dir) -> dict[str, jsonschema.Draft7Validator]:
    validators = {}
    for kind, file in (("RayCluster", "ray.io_rayclusters.yaml"), ("RayJob", "ray.io_rayjobs.yaml")):
        crd = yaml.load((kuberay_schemas_dir / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
        validators[kind] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    return validators


def test_kuberay_manifests_validate_against_the_crds(crd_validators):
    checked = 0
    for file, doc in k8s_objects():
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1", file
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in crd_validators[doc["kind"]].iter_errors(doc)]
            assert not errors, f"{file}: {errors[:5]}"
            checked += 1
    assert checked == 3, "raycluster.yaml, rayjob-train.yaml, rayjob-sweep.yaml"


@pytest.mark.parametrize("breakage", ["misspelled field", "unknown auth mode", "replicas as text"])
def test_crd_validation_rejects_broken_manifests(crd_validators, breakage):
    (cluster,) = copy.deepcopy(of_kind("RayCluster"))
    if breakage == "misspelled field":
        cluster["spec"]["enableInTreeAutoscalling"] = cluster["spec"].pop("enableInTreeAutoscaling")
    elif breakage == "unknown auth mode":
        cluster["spec"]["authOptions"]["mode"] = "password"
    else:
        cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "16"
    assert not crd_validators["RayCluster"].is_valid(cluster)


def test_rayjobs_bring_the_raycluster_spec_and_clean_up():
    (cluster,) = of_kind("RayCluster")
    jobs = {job["metadata"]["name"]: job["spec"] for job in of_kind("RayJob")}
    assert set(jobs) == {"clip-ray-train-vit-b32", "clip-ray-sweep-vit"}
    assert jobs["clip-ray-train-vit-b32"]["entrypoint"] == "python jobs/train.py --config configs/vit-b32-cluster.yaml"
    assert jobs["clip-ray-sweep-vit"]["entrypoint"] == "python tune/sweep.py --config configs/sweep-vit-cluster.yaml"
    for name, job in jobs.items():
        assert job["rayClusterSpec"] == cluster["spec"], f"{name}: its cluster drifted from raycluster.yaml"
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
        runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == "/app", "the image's copy of the repo (infra/docker/Dockerfile)"
        assert not any(re.search("TOKEN|SECRET|PASSWORD|KEY", var) for var in runtime_env.get("env_vars", {}))


def entrypoint(job_name: str) -> tuple[str, str]:
    (job,) = [job for job in of_kind("RayJob") if job["metadata"]["name"] == job_name]
    return re.fullmatch(r"python (\S+) --config (\S+)", job["spec"]["entrypoint"]).groups()


def cluster_job_configs() -> list[Path]:
    """The training job configs for a GPU cluster (a sweep file, sweep-*.yaml, wraps one of them)."""
    return sorted(p for p in (REPO_ROOT / "configs").glob("*-cluster.yaml") if not p.name.startswith("sweep-"))


def test_train_job_entrypoint_exists_and_checkpoints_to_shared_storage():
    script, config = entrypoint("clip-ray-train-vit-b32")
    assert (REPO_ROOT / script).is_file() and (REPO_ROOT / config).is_file()
    assert cluster_job_configs()
    for config in cluster_job_configs():
        storage = yaml.safe_load(config.read_text())["cluster"]["storage_path"]
        assert storage.startswith(("s3://", "gs://")), f"{config.name}: a multi-node run needs shared storage"


def test_sweep_job_entrypoint_exists():
    script, config = entrypoint("clip-ray-sweep-vit")
    if not (REPO_ROOT / script).exists():
        pytest.skip(f"{script} is not written yet (tune/, a later issue)")
    assert (REPO_ROOT / config).is_file()


def test_ray_clusters_have_token_auth_autoscaling_and_separate_cpu_and_gpu_groups():
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == ray.__version__
        assert spec["authOptions"] == {"mode": "token", "secretName": "clip-ray-ray-token"}, name
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head runs no Ray tasks"
        groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
        assert set(groups) == {"cpu-preprocess", "gpu-train"}
        for group in groups.values():
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        cpu_pod = groups["cpu-preprocess"]["template"]["spec"]
        gpu_pod = groups["gpu-train"]["template"]["spec"]
        cpu_resources = cpu_pod["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in cpu_resources["limits"] and "tolerations" not in cpu_pod
        gpu_resources = gpu_pod["containers"][0]["resources"]
        assert gpu_resources["requests"]["nvidia.com/gpu"] == gpu_resources["limits"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
        assert gpu_pod["nodeSelector"]
        for group_name, template in pod_templates(spec):
            pod = template["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            container = pod["containers"][0]
            assert container["image"] == IMAGE
            assert container["resources"]["requests"] and container["resources"]["limits"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{name}/{group_name}"
            assert pod["securityContext"]["runAsNonRoot"] is True


def test_gpu_group_can_host_the_cluster_configs():
    """The autoscaler can reach the GPUs a cluster config asks for, with the CPUs its workers take."""
    (cluster,) = of_kind("RayCluster")
    (gpu_group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-train"]
    gpus_per_pod = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    logical_cpus = int(gpu_group["rayStartParams"]["num-cpus"])
    for config in cluster_job_configs():
        wanted = yaml.safe_load(config.read_text())["cluster"]
        workers_per_pod = gpus_per_pod // wanted["gpus_per_worker"]
        assert wanted["num_workers"] <= gpu_group["maxReplicas"] * workers_per_pod, config.name
        assert workers_per_pod * wanted["cpus_per_worker"] < logical_cpus, f"{config.name}: no CPUs left for Ray Data"
        # Node roles: the GPU pods advertise what the workers ask for (enough for every worker of a pod),
        # the CPU-only pods none of it, so training never lands on a preprocessing pod.
        for name, amount in wanted.get("worker_resources", {}).items():
            assert advertised(gpu_group).get(name, 0) >= workers_per_pod * amount, f"{config.name}: {name}"
            assert all(name not in advertised(g) for g in cluster["spec"]["workerGroupSpecs"] if g is not gpu_group)


def advertised(group: dict) -> dict[str, float]:
    """A worker group's custom Ray resources: KubeRay takes `resources` as a quoted JSON string."""
    text = group["rayStartParams"].get("resources")
    return json.loads(text.strip('"').replace('\\"', '"')) if text else {}


# --- built-in Kubernetes objects ------------------------------------------------------

def validate_builtin(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_builtin_objects_validate_strictly():
    kinds = []
    for file, doc in k8s_objects():
        if not doc["apiVersion"].startswith("ray.io/"):
            try:
                validate_builtin(doc)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{file} {doc['kind']}/{doc['metadata']['name']}: {error}")
            kinds.append(doc["kind"])
    assert {"Namespace", "Deployment", "Service", "StatefulSet", "NetworkPolicy"} <= set(kinds)


def test_ray_pod_templates_validate_as_kubernetes_pod_templates():
    for name, spec in cluster_specs():
        for group, template in pod_templates(spec):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": f"{name}-{group}"}, "template": template}
            try:
                validate_builtin(pod_template)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}/{group}: {error}")


def test_kubernetes_validate_rejects_a_broken_deployment():
    (deployment,) = copy.deepcopy(of_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(deployment)


def test_secrets_are_referenced_never_inlined():
    assert not of_kind("Secret"), "Secrets are created with kubectl (infra/README.md), never committed"
    references = set()

    def walk(node):
        if isinstance(node, dict):
            if "name" in node and ("value" in node or "valueFrom" in node):  # an env var
                if re.search("TOKEN|SECRET|PASSWORD|ACCESS_KEY|BACKEND_STORE_URI", node["name"]):
                    assert "value" not in node, f"{node['name']} has a literal value"
                    ref = node["valueFrom"]["secretKeyRef"]
                    references.add((ref["name"], ref["key"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for _, doc in k8s_objects():
        walk(doc)
    assert {("clip-ray-mlflow-db", "backend-store-uri"), ("clip-ray-mlflow-db", "postgres-password"),
            ("clip-ray-s3", "AWS_SECRET_ACCESS_KEY")} <= references


def test_mlflow_server_uses_postgres_and_object_storage_behind_a_cluster_ip_service():
    (deployment,) = of_kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = dict(arg.lstrip("-").split("=", 1) for arg in container["args"])
    assert args["artifacts-destination"].startswith("s3://")
    assert {"mlflow.clip-ray.svc.cluster.local:*", "localhost:*"} <= set(args["allowed-hosts"].split(","))
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    services = {svc["metadata"]["name"]: svc["spec"] for svc in of_kind("Service")}
    assert services["mlflow"]["type"] == "ClusterIP", "no login: never a LoadBalancer"
    (statefulset,) = of_kind("StatefulSet")
    assert statefulset["spec"]["serviceName"] == "postgres" and services["postgres"]["clusterIP"] == "None"
    for _, spec in cluster_specs():
        env = {e["name"]: e.get("value") for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.clip-ray.svc.cluster.local:5000"
