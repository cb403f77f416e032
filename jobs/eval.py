"""Evaluates a checkpoint or an MLflow model on the config's validation pairs and zero-shot folder.

    python jobs/eval.py runs/demo                          # the demo run's latest checkpoint, demo data
    python jobs/eval.py runs:/RUN_ID/model --config configs/flickr8k-cpu.yaml
    ray job submit --working-dir . -- python jobs/eval.py s3://BUCKET/runs/RUN/checkpoint_... --config ...

Prints a table and the metrics as JSON. Options are those of `clip-ray eval --help`.
"""

import sys

from clip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
