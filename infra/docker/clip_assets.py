"""Writes the two files the cluster configs read from /opt/clip-ray at image build time.

CLIP's BPE merges file and the ImageNet class names (in the standard class order)
come from the OpenCLIP wheel, read as a zip archive: nothing is installed or
imported from it, and nothing is downloaded when a job runs.

    python clip_assets.py open_clip_torch-3.3.0-py3-none-any.whl /opt/clip-ray
"""

import ast
import sys
import zipfile
from pathlib import Path

MERGES = "open_clip/bpe_simple_vocab_16e6.txt.gz"
METADATA = "open_clip/zero_shot_metadata.py"


def imagenet_class_names(metadata_source: str) -> list[str]:
    """The IMAGENET_CLASSNAMES tuple, read from the module's syntax tree (never executed)."""
    for node in ast.parse(metadata_source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IMAGENET_CLASSNAMES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise ValueError(f"IMAGENET_CLASSNAMES not found in {METADATA}")


def main(wheel: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        (out / Path(MERGES).name).write_bytes(archive.read(MERGES))
        names = imagenet_class_names(archive.read(METADATA).decode())
    if len(names) != 1000:
        raise ValueError(f"expected 1000 ImageNet classes, found {len(names)}")
    (out / "imagenet_classnames.txt").write_text("\n".join(names) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
