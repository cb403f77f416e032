"""WiSE-FT: mixes a model with its fine-tuned version at several ratios, evaluates each mixture, keeps the best.

A suite (features on Ray Data encoder actors; each alpha's results in OUTPUT/alphas/):

    python jobs/wise_ft.py --initial runs/flickr8k-vit-tiny --finetuned runs/flickr8k-vit-tiny-finetune \
        --suite configs/suites/flickr8k-retrieval.yaml --output wise-ft-results/flickr8k

The run's own evaluation (data.val retrieval and loss, zero-shot on data.zeroshot_dir), on the driver:

    python jobs/wise_ft.py --initial runs/flickr8k-vit-tiny --finetuned runs/flickr8k-vit-tiny-finetune \
        --config configs/flickr8k-finetune-cpu.yaml --alphas 0,0.25,0.5,0.75,1

The best mixture is a checkpoint (OUTPUT/best) that `python jobs/eval.py OUTPUT/best ...` and
`model.init_from: OUTPUT/best` load; one MLflow run (experiment clip-ray-wise-ft) holds every metric per
alpha (step = 100 * alpha) and the best. On a cluster:

    ray job submit --working-dir . -- python jobs/wise_ft.py --initial s3://BUCKET/runs/BASE \
        --finetuned s3://BUCKET/runs/TUNED --suite configs/suites/shared.yaml --tracking-uri http://mlflow:5000

Options are those of `clip-ray wise-ft --help`.
"""

import sys

from clip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["wise-ft", *sys.argv[1:]]))
