"""Shared fixtures: where the real photos live, and how their absence is handled; a local Ray cluster.

Tests that read ../shared/data skip with a reason in a user's fresh clone; CI sets
CLIP_RAY_REQUIRE_SHARED=1 so the same absence is a failure there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from repo_paths import REPO_ROOT

SHARED_DATA = Path(os.environ.get("CLIP_RAY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _required_dir(path: Path, what: str) -> Path:
    """`path`, or a skip naming it (a failure where CI requires ../shared)."""
    if not path.is_dir():
        reason = f"{what} {path} {'are' if what.endswith('s') else 'is'} absent (beside the repo in ../shared)"
        if os.environ.get("CLIP_RAY_REQUIRE_SHARED") == "1":
            pytest.fail(f"CLIP_RAY_REQUIRE_SHARED=1 but {reason}")
        pytest.skip(reason)
    return path


def _shared_dir(name: str) -> Path:
    return _required_dir(SHARED_DATA / name, "real data")


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    """../shared/data/flickr8k: images/, captions.csv, splits/{train,test}.txt."""
    return _shared_dir("flickr8k")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """../shared/data/cifar10-test: ImageFolder layout, 10 classes of 32x32 JPEGs."""
    return _shared_dir("cifar10-test")


@pytest.fixture(scope="session")
def kuberay_schemas_dir() -> Path:
    """../shared/schemas/kuberay: KubeRay's RayCluster and RayJob CRDs (openAPIV3Schema) to validate infra/k8s against."""
    path = Path(os.environ.get("CLIP_RAY_SHARED_SCHEMAS", REPO_ROOT.parent / "shared" / "schemas")) / "kuberay"
    return _required_dir(path, "KubeRay CRD schemas")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Toy models gain nothing from more threads, and on a busy 2-core machine OpenMP's spinning
    threads make them up to 100x slower; the thread count does not change any result here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ray.init arguments of `ray_cluster`; a module's RAY_INIT_KWARGS is laid over them.
DEFAULT_RAY_INIT_KWARGS = {"num_cpus": 4, "include_dashboard": False}


@pytest.fixture(scope="module")
def ray_cluster(request):
    """A fresh local Ray cluster for the module: `ray.init(address="local", ...)`, never an existing
    cluster, stopped at the module's end with clip_ray.ray_session.shutdown_ray (gc, then ray.shutdown),
    so the next module in the same pytest process starts its own.

    ray.init gets DEFAULT_RAY_INIT_KWARGS (4 CPUs, no dashboard) updated with the requesting
    module's optional `RAY_INIT_KWARGS` dict, e.g. in the test module:

        RAY_INIT_KWARGS = {"num_cpus": 2, "log_to_driver": False}
        pytestmark = pytest.mark.usefixtures("ray_cluster")  # every test of the module, as autouse would

    `address` cannot be overridden: these tests always run on their own local cluster.
    """
    import ray

    from clip_ray.ray_session import shutdown_ray

    overrides = getattr(request.module, "RAY_INIT_KWARGS", {})
    if "address" in overrides:
        raise ValueError(f"{request.module.__name__}.RAY_INIT_KWARGS may not set 'address': ray_cluster is local only")
    ray.init(address="local", **{**DEFAULT_RAY_INIT_KWARGS, **overrides})
    yield
    shutdown_ray()
