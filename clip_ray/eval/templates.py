"""Prompt templates and class names for zero-shot classification.

A class name alone ("dog") is a poor caption: web captions rarely consist of one
word, and one word is ambiguous ("crane"). The CLIP paper wraps each name in many
templates ("a photo of a {}.") and averages their embeddings; the 80 ImageNet
templates below are the ensemble from its released prompt-engineering notebook.
Every template holds exactly one "{}" and is filled with `str.format`.
"""

from __future__ import annotations

from pathlib import Path

# The CLIP paper's 80 ImageNet templates, in the notebook's order.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The paper's 18 CIFAR templates: low-resolution photos of whole objects.
CIFAR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

# A short generic ensemble: cheap to encode, fine for small models and quick checks.
SIMPLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
)

# Phrasings the demo data's captions use, so a model trained on them meets familiar words.
DEMO_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "a {} on a background.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a drawing of a {}.",
)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": IMAGENET_TEMPLATES,
    "cifar": CIFAR_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "demo": DEMO_TEMPLATES,
}


def check_template(template: str, where: str = "template") -> str:
    """Refuses a template `str.format(name)` would not fill with exactly one class name."""
    if template.count("{}") != 1:
        raise ValueError(f"{where}: {template!r} must contain '{{}}' exactly once, where the class name goes")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as err:
        raise ValueError(f"{where}: {template!r} has stray braces ({err}); write literal braces as '{{{{' and '}}}}'") from None
    return template


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank, non-comment lines with their 1-based line numbers."""
    with path.open(encoding="utf-8") as f:
        numbered = [(n, line.strip()) for n, line in enumerate(f, start=1)]
    return [(n, line) for n, line in numbered if line and not line.startswith("#")]


def load_templates(source: str | Path) -> list[str]:
    """Templates by set name (see TEMPLATE_SETS) or from a file, one per line ('#' starts a comment)."""
    if isinstance(source, str) and source in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[source])
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"templates {str(source)!r}: neither a file nor one of {', '.join(TEMPLATE_SETS)}")
    templates = [check_template(line, f"{path}:{n}") for n, line in _read_lines(path)]
    if not templates:
        raise ValueError(f"{path}: holds no templates")
    return templates


def load_class_names(source: str | Path) -> list[str]:
    """Class names from a text file (one per line) or an ImageFolder directory (its sorted subfolders).

    Sorted subfolders are the ImageFolder convention, so index i is label i there too.
    """
    path = Path(source)
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise ValueError(f"{path}: an ImageFolder directory needs one subfolder per class; found none")
        return names
    if not path.is_file():
        raise FileNotFoundError(f"class names {str(source)!r}: no such file or directory")
    names = [line for _, line in _read_lines(path)]
    if not names:
        raise ValueError(f"{path}: holds no class names")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}: class names repeat: {', '.join(duplicates)}")
    return names
