"""Embeds a data set with a trained model on the cluster this job runs in: Parquet files of embeddings.

    python jobs/embed.py INPUT OUTPUT --model runs/demo --embed both
    ray job submit --working-dir . -- python jobs/embed.py s3://BUCKET/shards s3://BUCKET/embeddings \
        --model s3://BUCKET/runs/RUN --tokenizer tokenizer.json --concurrency 8 --num-gpus-per-actor 0.5

Options are those of `clip-ray embed --help`. Running it again skips the partitions already written.
"""

import sys

from clip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
