"""The repository root, defined once for every test module and helper.

Import it as `from repo_paths import REPO_ROOT`: pytest puts tests/ on sys.path
(no __init__.py here, rootdir conftest), as it does for the other helpers.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
