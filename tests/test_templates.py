"""Prompt templates and class-name loading for zero-shot classification."""

from __future__ import annotations

import pytest

from clip_ray.eval.templates import (
    CIFAR10_CLASSES, IMAGENET_TEMPLATES, TEMPLATE_SETS, check_template, load_class_names, load_templates,
)


def test_imagenet_set_holds_the_papers_80_templates():
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert "itap of a {}." in IMAGENET_TEMPLATES


def test_imagenet_set_matches_open_clip_copy():
    metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    assert [template("{}") for template in metadata.OPENAI_IMAGENET_TEMPLATES] == list(IMAGENET_TEMPLATES)


def test_every_named_set_fills_with_a_class_name():
    assert {"imagenet80", "cifar", "simple", "demo"} <= set(TEMPLATE_SETS)
    for name, templates in TEMPLATE_SETS.items():
        assert load_templates(name) == list(templates)
        for template in templates:
            filled = check_template(template).format("red circle")
            assert "red circle" in filled and "{" not in filled


def test_load_templates_from_file_names_the_bad_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na photo of a {}.\n\na {} in the wild.\n")
    assert load_templates(path) == ["a photo of a {}.", "a {} in the wild."]

    path.write_text("a photo of a {}.\n# comment\na photo without a slot\n")
    with pytest.raises(ValueError, match=rf"{path}:3: 'a photo without a slot'"):
        load_templates(path)
    path.write_text("a {} and a {}.\n")
    with pytest.raises(ValueError, match=rf"{path}:1"):
        load_templates(path)
    path.write_text("a {0} photo of {}.\n")
    with pytest.raises(ValueError, match="stray braces"):
        load_templates(path)
    with pytest.raises(FileNotFoundError, match="imagenet80"):
        load_templates(tmp_path / "absent.txt")


def test_class_names_from_imagefolder(cifar10_dir):
    names = load_class_names(cifar10_dir)
    assert names == sorted(CIFAR10_CLASSES)
    assert len(names) == 10


def test_class_names_from_text_file_keep_their_order(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("zebra\n\nred circle\n  apple  \n")
    assert load_class_names(path) == ["zebra", "red circle", "apple"]
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match="repeat: cat"):
        load_class_names(path)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ValueError, match="one subfolder per class"):
        load_class_names(tmp_path / "empty_folder")
