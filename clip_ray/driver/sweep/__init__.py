"""Scaling sweeps: Ray Tune over clip-ray training jobs, then the scaling-law analysis.

    trials.py  a trial's point in the space, its job config, its Tune driver and record
    runner.py  the Tuner (new or restored), the MLflow parent run, the tables, the analysis
"""

from clip_ray.driver.sweep.runner import SweepOutcome, run_sweep

__all__ = ["SweepOutcome", "run_sweep"]
