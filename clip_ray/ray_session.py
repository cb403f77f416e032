"""How a clip-ray job finds its Ray cluster.

Three situations, one rule each:

- Ray is already initialised (a test, a notebook, a caller that knows better):
  use it as it is. This is what makes library functions safe to call from tests
  that started their own `ray.init(address="local", ...)`.
- An address is given, or RAY_ADDRESS is set (`ray job submit` sets it for the
  entrypoint): connect to that cluster.
- Otherwise start a fresh local cluster. Never `address="auto"`: another process
  on the machine may run its own Ray, and a job must not wander into it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from typing import Iterator

import ray

log = logging.getLogger(__name__)


def connect_ray(address: str | None = None, num_cpus: int | None = None, **init_kwargs) -> bool:
    """Makes sure this process is a Ray driver; True when this call did the ray.init.

    `num_cpus` only applies to a local cluster started here (a cluster that
    exists already has its own resources). Extra keyword arguments go to ray.init.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        init_kwargs.pop("include_dashboard", None)  # the cluster's own head decides that
        ray.init(address=address, **init_kwargs)
    else:
        log.info("starting a local Ray cluster (num_cpus=%s)", num_cpus)
        # With its dashboard (on 127.0.0.1): Ray's State API lives there, and without it Ray Train's
        # placement-group cleaner warns every second and Tune's ASHA leaks stopped trials' workers.
        init_kwargs.setdefault("include_dashboard", True)
        ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
    return True


def shutdown_ray() -> None:
    """ray.shutdown(), after freeing this session's unreachable objects.

    Ray Data leaves actor handles and ObjectRefs in reference cycles. Collected later,
    in another session of the same process (a notebook, a test run), they would release
    their references through that session's core worker.
    """
    gc.collect()
    ray.shutdown()


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, **init_kwargs) -> Iterator[None]:
    """connect_ray for the length of a `with` block; disconnects (and stops a local cluster) only if it connected."""
    connected_here = connect_ray(address, num_cpus, **init_kwargs)
    try:
        yield
    finally:
        if connected_here:
            shutdown_ray()


def cluster_cpus() -> int:
    """Logical CPUs of the connected cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
