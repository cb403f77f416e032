"""Trains CLIP on the Ray cluster this job runs in (or a local one), tracked in MLflow.

    python jobs/train.py                    # the demo: local Ray, generated data, ./mlflow.db; minutes on 2 cores
    python jobs/train.py --config configs/flickr8k-cpu.yaml --set train.lr=1e-4 train.steps=2000
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py --config CONFIG

Re-running with the same cluster.storage_path and cluster.run_name resumes from the
latest checkpoint; --set cluster.fresh_start=true moves the old run aside instead.
Options are those of `clip-ray train --help`.
"""

import sys

from clip_ray.cli import main

if __name__ == "__main__":  # the demo draws its data in a process pool, which re-imports this file
    sys.exit(main(["train", *sys.argv[1:]]))
