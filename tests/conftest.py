"""Shared fixtures: where the real photos live, and how their absence is handled.

Tests that read ../shared/data skip with a reason in a user's fresh clone; CI sets
CLIP_RAY_REQUIRE_SHARED=1 so the same absence is a failure there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CLIP_RAY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _shared_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        reason = f"real data {path} is absent (it sits beside the repo as ../shared/data)"
        if os.environ.get("CLIP_RAY_REQUIRE_SHARED") == "1":
            pytest.fail(f"CLIP_RAY_REQUIRE_SHARED=1 but {reason}")
        pytest.skip(reason)
    return path


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
    if not path.is_dir():
        reason = f"KubeRay CRD schemas {path} are absent (they sit beside the repo as ../shared/schemas)"
        if os.environ.get("CLIP_RAY_REQUIRE_SHARED") == "1":
            pytest.fail(f"CLIP_RAY_REQUIRE_SHARED=1 but {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Toy models gain nothing from more threads, and on a busy 2-core machine OpenMP's spinning
    threads make them up to 100x slower; the thread count does not change any result here."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
