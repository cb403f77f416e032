"""Nearest neighbours of a text or an image in the files `jobs/embed.py` wrote.

    python jobs/search.py embeddings/ --text "a red circle on a blue background" -k 5
    python jobs/search.py embeddings/ --image query.jpg

Options are those of `clip-ray search --help`.
"""

import sys

from clip_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
