"""Host and GPU metrics (CPU, memory, disk, network, NVIDIA GPU) for the tracker to log.

MLflow's own probes, but sampled by the tracker's thread rather than MLflow's
monitor thread: the values then go through the same buffer as every other
metric and survive a server outage, where MLflow's thread gives up at the first
failed send.
"""

from __future__ import annotations

import logging

# The tracker's logger: these are the tracker's warnings.
logger = logging.getLogger("clip_ray.tracking.tracker")


class SystemProbes:
    """MLflow's CPU/memory, disk and network monitors, plus the GPU one where NVML finds a GPU.

    Falsy when there are none: when off, when psutil is missing (warned), or
    after a failed reading (warned), since a probe that failed once is not trusted again.
    """

    def __init__(self, enabled: bool = True):
        self.monitors = _monitors() if enabled else []

    def __bool__(self) -> bool:
        return bool(self.monitors)

    def read(self) -> dict[str, float]:
        """One reading of every probe, by MLflow's metric names (without the "system/" prefix)."""
        values: dict[str, float] = {}
        try:
            for monitor in self.monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
        except Exception as err:
            logger.warning("System metrics failed (%s); they are off", err)
            self.monitors = []
            return {}
        return values


def _monitors() -> list:
    try:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    except ImportError as err:
        logger.warning("System metrics are off: %s (pip install psutil)", err)
        return []
    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception as err:  # no NVIDIA GPU, or nvidia-ml-py missing
        logger.debug("No GPU system metrics: %s", err)
    return monitors
