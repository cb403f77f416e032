"""Prompt templates and class names for zero-shot classification.

A class name alone ("dog") is a poor caption: web captions rarely consist of one
word, and one word is ambiguous ("crane"). The CLIP paper wraps each name in many
templates ("a photo of a {}.") and averages their embeddings; the 80 ImageNet
templates below are the ensemble from its released prompt-engineering notebook.
Every template holds exactly one "{}" and is filled with `str.format`.

Class names of CIFAR-10, CIFAR-100 and ImageNet-1k ship as package data (class_names/*.txt, one name
per line in label order, written as readable English for prompts). A suite names either kind of list
by set name, by file, or literally; `resolve_class_names` and `resolve_templates` accept all three.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Callable

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

# A benchmark's name also names its templates, so a suite can say the same word for both lists.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": IMAGENET_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
    "cifar": CIFAR_TEMPLATES,
    "cifar10": CIFAR_TEMPLATES,
    "cifar100": CIFAR_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "demo": DEMO_TEMPLATES,
}


def _packaged_class_names(name: str) -> tuple[str, ...]:
    """One shipped list, class_names/<name>.txt: every line a name, in label order."""
    text = resources.files(__package__).joinpath("class_names").joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines())


# Label order: CIFAR's label indices (CIFAR-100's fine labels), ImageNet-1k's class indices
# (sorted WordNet ids, n01440764 tench first, n15075141 toilet tissue last).
CLASS_NAME_SETS: dict[str, tuple[str, ...]] = {
    name: _packaged_class_names(name) for name in ("cifar10", "cifar100", "imagenet")
}
CIFAR10_CLASSES: tuple[str, ...] = CLASS_NAME_SETS["cifar10"]


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
    return _checked_class_names([line for _, line in _read_lines(path)], str(path))


def _checked_class_names(names: list[str], where: str) -> list[str]:
    """Refuses an empty list, a blank or non-string name, and a name given twice."""
    if not names:
        raise ValueError(f"{where}: holds no class names")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: class name {i} is {name!r}; every name must be a non-empty string")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{where}: class names repeat: {', '.join(duplicates)}")
    return names


def _checked_templates(templates: list[str], where: str) -> list[str]:
    if not templates:
        raise ValueError(f"{where}: holds no templates")
    for i, template in enumerate(templates):
        if not isinstance(template, str):
            raise ValueError(f"{where}: item {i} is {template!r}, not a string")
        check_template(template, f"{where} item {i}")
    return templates


def _resolve(spec: object, what: str, named: dict[str, tuple[str, ...]], from_path: Callable[[Path], list[str]],
             path_kinds: str, from_list: Callable[[list[str], str], list[str]]) -> list[str]:
    """A named set, a path `from_path` reads (when it exists), or a literal list `from_list` checks."""
    if isinstance(spec, (list, tuple)):
        return from_list(list(spec), f"{what} list")
    if isinstance(spec, str) and spec in named:
        return list(named[spec])
    if isinstance(spec, (str, os.PathLike)) and Path(spec).exists():
        try:
            return from_path(Path(spec))
        except FileNotFoundError as err:  # a directory where a file belongs
            raise ValueError(f"{what} {str(spec)!r}: {err}") from None
    raise ValueError(f"{what} {spec!r}: neither a named set ({', '.join(named)}), {path_kinds}, nor a list")


def resolve_class_names(spec: str | list[str]) -> list[str]:
    """Class names from a set name (see CLASS_NAME_SETS), a text file or ImageFolder directory, or a literal list."""
    def from_list(names: list[str], where: str) -> list[str]:
        return _checked_class_names([n.strip() if isinstance(n, str) else n for n in names], where)
    return _resolve(spec, "class_names", CLASS_NAME_SETS, load_class_names,
                    "an existing file or ImageFolder directory", from_list)


def resolve_templates(spec: str | list[str]) -> list[str]:
    """Templates from a set name (see TEMPLATE_SETS), a file (one per line), or a literal list."""
    return _resolve(spec, "templates", TEMPLATE_SETS, load_templates, "an existing file", _checked_templates)
