"""CLIP-style curation (query match, per-query cap, image dedup) on the cluster this job runs in.

    ray job submit --working-dir . -- python jobs/curate.py INPUT OUTPUT --queries QUERIES [options]

Options are those of `clip-ray data curate --help`.
"""

import sys

from clip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "curate", *sys.argv[1:]]))
