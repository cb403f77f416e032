"""Prompt templates and class-name loading for zero-shot classification."""

from __future__ import annotations

from pathlib import Path

import pytest

from clip_ray.eval.templates import (
    CIFAR10_CLASSES, CLASS_NAME_SETS, IMAGENET_TEMPLATES, TEMPLATE_SETS, check_template, load_class_names,
    load_templates, resolve_class_names, resolve_templates,
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


def test_shipped_class_lists_count_and_order():
    assert {name: len(names) for name, names in CLASS_NAME_SETS.items()} == {"cifar10": 10, "cifar100": 100,
                                                                              "imagenet": 1000}
    for name, names in CLASS_NAME_SETS.items():
        assert len(set(names)) == len(names), name
        assert all(n and n == n.strip() and "_" not in n for n in names), name
    assert CLASS_NAME_SETS["cifar10"] == CIFAR10_CLASSES
    # CIFAR-100's fine labels are numbered in alphabetical order of their underscored names.
    cifar100 = [n.replace(" ", "_") for n in CLASS_NAME_SETS["cifar100"]]
    assert cifar100 == sorted(cifar100) and cifar100[0] == "apple" and cifar100[-1] == "worm"
    imagenet = CLASS_NAME_SETS["imagenet"]
    assert (imagenet[0], imagenet[-1]) == ("tench", "toilet tissue")  # n01440764 and n15075141
    landmarks = {1: "goldfish", 151: "Chihuahua", 207: "Golden Retriever", 281: "tabby cat", 340: "zebra",
                 388: "giant panda", 417: "balloon", 817: "sports car", 948: "Granny Smith apple", 980: "volcano"}
    assert {i: imagenet[i] for i in landmarks} == landmarks


def test_shipped_class_lists_are_package_data():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"clip_ray.eval" = ["class_names/*.txt"]' in pyproject
    shipped = Path(__file__).resolve().parents[1] / "clip_ray" / "eval" / "class_names"
    assert sorted(p.stem for p in shipped.glob("*.txt")) == sorted(CLASS_NAME_SETS)
    assert len((shipped / "imagenet.txt").read_text(encoding="utf-8").splitlines()) == 1000


def test_every_named_template_set_formats_every_class_name():
    names = [name for names in CLASS_NAME_SETS.values() for name in names]
    for set_name, templates in TEMPLATE_SETS.items():
        for template in templates:
            for name in names:
                filled = template.format(name)
                assert name in filled and "{" not in filled.replace(name, ""), (set_name, template, name)


def test_resolve_takes_a_set_name_a_file_or_a_list(tmp_path, cifar10_dir):
    assert resolve_class_names("cifar100") == list(CLASS_NAME_SETS["cifar100"])
    assert resolve_class_names(["cat", " dog "]) == ["cat", "dog"]
    assert resolve_class_names(str(cifar10_dir)) == sorted(CIFAR10_CLASSES)
    names_file = tmp_path / "names.txt"
    names_file.write_text("zebra\nokapi\n")
    assert resolve_class_names(str(names_file)) == ["zebra", "okapi"]
    assert resolve_templates("imagenet") == list(IMAGENET_TEMPLATES) == resolve_templates("imagenet80")
    assert resolve_templates("cifar100") == list(TEMPLATE_SETS["cifar"])
    assert resolve_templates(["a {}.", "itap of a {}."]) == ["a {}.", "itap of a {}."]
    templates_file = tmp_path / "templates.txt"
    templates_file.write_text("a photo of a {}.\n")
    assert resolve_templates(str(templates_file)) == ["a photo of a {}."]


def test_resolve_names_the_bad_spec(tmp_path):
    with pytest.raises(ValueError, match="class_names 'cifar1000': neither a named set .*cifar100"):
        resolve_class_names("cifar1000")
    with pytest.raises(ValueError, match="class_names list: class names repeat: cat"):
        resolve_class_names(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="class_names list: class name 1 is ''"):
        resolve_class_names(["cat", " "])
    with pytest.raises(ValueError, match="class_names list: holds no class names"):
        resolve_class_names([])
    with pytest.raises(ValueError, match="class_names 7"):
        resolve_class_names(7)
    with pytest.raises(ValueError, match="templates 'imagenet81': neither a named set .*imagenet80"):
        resolve_templates("imagenet81")
    with pytest.raises(ValueError, match="templates 'missing.txt'"):
        resolve_templates("missing.txt")
    with pytest.raises(ValueError, match="templates '.*': templates"):
        resolve_templates(str(tmp_path))
    with pytest.raises(ValueError, match="templates list item 1: 'a photo'"):
        resolve_templates(["a {}.", "a photo"])
    with pytest.raises(ValueError, match="templates list: holds no templates"):
        resolve_templates([])
