"""What both infra test files read: where infra/ is, the image it names, and its YAML documents."""

from __future__ import annotations

from pathlib import Path

import yaml
from repo_paths import REPO_ROOT

INFRA = REPO_ROOT / "infra"
# The image every Kubernetes manifest and cluster launcher config runs: one tag, bumped together.
IMAGE = "registry.example.com/clip-ray:0.1.0"


def documents(path: Path) -> list[dict]:
    """The documents of a YAML file that may hold several; empty ones (a stray '---') dropped."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
