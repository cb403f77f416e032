"""Converts image-text data to shards on the cluster this job runs in.

    ray job submit --working-dir . -- python jobs/convert.py INPUT OUTPUT [options]

Options are those of `clip-ray data convert --help`.
"""

import sys

from clip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "convert", *sys.argv[1:]]))
