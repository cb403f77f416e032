"""`clip-ray eval MODEL --suite SUITE.yaml`: a benchmark suite of zero-shot, linear-probe and retrieval tasks.

    features.py  a task's images (or captions) through the encoder actor pool, back in input order
    tasks.py     the three task types: their features, then the metrics training's evaluation uses too
    runner.py    checking a suite, running its tasks, the results files and the MLflow run
"""

from clip_ray.driver.suite.runner import SuiteOutcome, evaluate_suite, model_short_id, prepare_suite

__all__ = ["SuiteOutcome", "evaluate_suite", "model_short_id", "prepare_suite"]
