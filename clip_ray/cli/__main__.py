"""`python -m clip_ray.cli ...`, the same as the `clip-ray` command."""

import sys

from clip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
