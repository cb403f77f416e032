"""Evaluates a checkpoint or an MLflow model: on a config's evaluation data, or on a benchmark suite.

A config's data (zero-shot on data.zeroshot_dir, retrieval recall and loss on data.val, as in training):

    python jobs/eval.py runs/demo                          # the demo run's latest checkpoint, demo data
    python jobs/eval.py runs:/RUN_ID/model --config configs/flickr8k-cpu.yaml

A suite (zero-shot, linear probes, retrieval; features on Ray Data encoder actors; a table printed,
results.csv/.md/.json in --output, one MLflow run in the experiment clip-ray-eval):

    python jobs/eval.py runs/flickr8k-vit-tiny --suite configs/suites/shared.yaml
    python jobs/eval.py runs/demo --suite configs/suites/demo.yaml --output eval-results/demo
    python jobs/eval.py runs:/RUN_ID --suite configs/suites/shared.yaml --tracking-uri http://mlflow:5000 \
        --experiment clip-ray-eval --set defaults.num_gpus_per_actor=0.5

On a cluster (the suite's data and the model must be readable from the head node, where the job's
driver runs, and the images from every node: absolute paths on a shared mount, or URIs):

    ray job submit --working-dir . -- python jobs/eval.py s3://BUCKET/runs/RUN \
        --suite configs/suites/shared.yaml --tracking-uri http://mlflow:5000 \
        --set tasks.cifar10-zeroshot.images.image_folder=/mnt/data/cifar10-test ...
    ray job submit --working-dir . -- python jobs/eval.py s3://BUCKET/runs/RUN/checkpoint_... --config ...

Options are those of `clip-ray eval --help`.
"""

import sys

from clip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
