"""A scaling sweep on the Ray cluster this job runs in (or a local one), tracked in MLflow.

    python tune/sweep.py --config configs/sweep-demo-cpu.yaml          # 2 CPU cores, ~15 minutes
    ray job submit --address http://HEAD:8265 --working-dir . -- python tune/sweep.py \
        --config configs/sweep-vit-cluster.yaml

Every trial is the sweep's base job at one model width x samples seen (x learning
rate), run as a Ray Train job inside a Ray Tune trial; the sweep ends with the
scaling-law analysis of tune/analyze.py, logged to the sweep's MLflow parent run.
Running the same sweep name again resumes it. Options: `clip-ray sweep --help`.
"""

import sys

from clip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
