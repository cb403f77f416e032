"""The drawn demo data: deterministic, held-out combinations really held out, pixels and captions that agree."""

from __future__ import annotations

import colorsys
import io
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_ray.config import ConfigError, DemoDataConfig, from_dict
from clip_ray.data.demo.scenes import COLOUR_WORDS, HUES, SHAPE_WORDS, caption_scene, render_scene
from clip_ray.data.demo.synthetic import generate_demo_data
from clip_ray.data.formats import read_tar_shard
from clip_ray.eval.templates import load_class_names

TINY = dict(image_size=64, num_train=600, num_val=150, num_zeroshot_per_class=3, samples_per_shard=250)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate_demo_data(tmp_path_factory.mktemp("demo"), DemoDataConfig(**TINY))


def read_samples(shards: list[str]) -> list:
    return [sample for shard in shards for sample in read_tar_shard(shard)]


def all_files(root: str) -> dict[str, bytes]:
    """Every shard and zero-shot image under a data set's root, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(Path(root).rglob("*")) if p.suffix in (".tar", ".jpg")}


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(demo, tmp_path):
    again = generate_demo_data(tmp_path / "again", DemoDataConfig(**TINY, num_workers=2))
    first, second = all_files(demo.root), all_files(again.root)
    assert len(first) == 3 + 1 + 36 * 3  # train shards, val shard, zero-shot images
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)

    other = generate_demo_data(tmp_path / "other", DemoDataConfig(**TINY, seed=1))
    third = all_files(other.root)
    assert third.keys() == first.keys()
    assert all(third[name] != first[name] for name in first if name.endswith(".tar"))


def test_training_shards_avoid_held_out_combinations_but_cover_every_word(demo):
    config = demo.config
    held_out = set(config.held_out_classes())
    train = read_samples(demo.train_shards)
    assert len(train) == config.num_train
    train_classes = Counter(s.meta["class_name"] for s in train)
    assert not held_out & set(train_classes)
    assert set(train_classes) == {f"{c} {s}" for c, s in config.seen_combos()}
    assert {s.meta["colour"] for s in train} == set(config.colours)
    assert {s.meta["shape"] for s in train} == set(config.shapes)

    # The retrieval pairs draw from every combination, so they include held-out ones.
    val = read_samples(demo.val_shards)
    assert len(val) == config.num_val
    assert held_out & {s.meta["class_name"] for s in val}
    assert not {s.key for s in val} & {s.key for s in train}


def test_latin_square_holds_out_each_colour_and_shape_equally():
    config = DemoDataConfig()
    held_out = config.held_out_classes()
    assert len(held_out) == len(config.colours) * config.held_out_per_colour
    colours = Counter(name.split(" ")[0] for name in held_out)
    shapes = Counter(name.split(" ")[1] for name in held_out)
    assert set(colours.values()) == {2} and set(colours) == set(config.colours)
    assert set(shapes.values()) == {2} and set(shapes) == set(config.shapes)


def words_of(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "


def test_captions_name_colour_and_shape_in_many_phrasings(demo):
    train = read_samples(demo.train_shards)
    for sample in train:
        caption = words_of(sample.caption)
        colour, shape = sample.meta["colour"], sample.meta["shape"]
        assert any(f" {word} " in caption for word in COLOUR_WORDS[colour]), sample.caption
        forms = [form for pair in SHAPE_WORDS[shape] for form in pair]
        assert any(f" {form} " in caption for form in forms), sample.caption
    captions = [s.caption for s in train]
    assert len(set(captions)) > 0.9 * len(captions)
    # Positions and backgrounds are named now and then, not always and not never.
    with_background = sum(" background " in words_of(c) or " backdrop " in words_of(c) for c in captions)
    assert 0.1 * len(captions) < with_background < 0.7 * len(captions)


def hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 360 - abs(a - b))


def test_pixels_show_the_colour_the_caption_names(demo):
    config = demo.config
    checked = 0
    for sample in read_samples(demo.train_shards + demo.val_shards):
        pixels = np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"), dtype=np.float32)
        assert pixels.shape == (config.image_size, config.image_size, 3)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        background = np.median(border, axis=0)
        assert len(sample.meta["boxes"]) == sample.meta["count"]
        for x0, y0, x1, y1 in sample.meta["boxes"]:
            assert 0 <= x0 < x1 <= config.image_size and 0 <= y0 < y1 <= config.image_size
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            centre = pixels[cy - 1: cy + 2, cx - 1: cx + 2].reshape(-1, 3).mean(axis=0)
            hue = colorsys.rgb_to_hsv(*(centre / 255))[0] * 360
            nearest = min(config.colours, key=lambda name: hue_distance(hue, HUES[name]))
            assert nearest == sample.meta["colour"], (sample.key, sample.caption, centre)
            assert np.linalg.norm(centre - background) > 60, (sample.key, centre, background)
            checked += 1
    assert checked > config.num_train


@pytest.mark.parametrize("size", [32, 128])
def test_scenes_render_at_other_sizes(size):
    rng = np.random.default_rng(7)
    for combo in [("red", "star"), ("blue", "heart"), ("green", "cross")]:
        image, attributes = render_scene(rng, combo, size)
        assert image.size == (size, size) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.float32)
        x0, y0, x1, y1 = attributes["boxes"][0]
        centre = pixels[int((y0 + y1) / 2), int((x0 + x1) / 2)]
        assert hue_distance(colorsys.rgb_to_hsv(*(centre / 255))[0] * 360, HUES[combo[0]]) < 20
        assert attributes["class_name"] == f"{combo[0]} {combo[1]}"
        caption = words_of(caption_scene(rng, attributes))
        assert any(f" {form} " in caption for pair in SHAPE_WORDS[combo[1]] for form in pair), caption


def test_zeroshot_folders_hold_one_folder_per_class(demo):
    config = demo.config
    assert demo.class_names == config.held_out_classes()
    assert load_class_names(demo.zeroshot_dir) == demo.class_names
    assert load_class_names(demo.zeroshot_seen_dir) == demo.seen_class_names
    assert not set(demo.class_names) & set(demo.seen_class_names)
    assert len(demo.class_names) + len(demo.seen_class_names) == len(config.colours) * len(config.shapes)
    assert demo.chance_level == pytest.approx(1 / len(demo.class_names))
    for folder, names in ((demo.zeroshot_dir, demo.class_names), (demo.zeroshot_seen_dir, demo.seen_class_names)):
        for name in names:
            images = sorted((Path(folder) / name).glob("*.jpg"))
            assert len(images) == config.num_zeroshot_per_class
            assert Image.open(images[0]).size == (config.image_size, config.image_size)


def test_second_call_reuses_the_data_and_a_new_config_redraws_it(demo, tmp_path):
    root = tmp_path / "reuse"
    config = DemoDataConfig(**{**TINY, "num_train": 100, "num_val": 20, "num_zeroshot_per_class": 1})
    first = generate_demo_data(root, config)
    stamps = {p: Path(p).stat().st_mtime_ns for p in first.train_shards}
    started = time.perf_counter()
    second = generate_demo_data(root, config)
    assert time.perf_counter() - started < 1.0
    assert second == first
    assert {p: Path(p).stat().st_mtime_ns for p in second.train_shards} == stamps

    # A lost shard means an unfinished data set: it is drawn again, not trusted.
    Path(first.train_shards[0]).unlink()
    assert generate_demo_data(root, config).train_shards == first.train_shards
    assert Path(first.train_shards[0]).is_file()

    bigger = DemoDataConfig(**{**TINY, "num_train": 300, "num_val": 20, "num_zeroshot_per_class": 1})
    redrawn = generate_demo_data(root, bigger)
    assert len(read_samples(redrawn.train_shards)) == 300


def test_config_is_checked_before_drawing():
    with pytest.raises(ConfigError, match="demo.colours"):
        DemoDataConfig(colours=("red", "mauve")).validate()
    with pytest.raises(ConfigError, match="every colour and every shape"):
        DemoDataConfig(held_out=tuple(f"{c} star" for c in DemoDataConfig().colours)).validate()
    with pytest.raises(ConfigError, match="demo.held_out"):
        DemoDataConfig(held_out=("red dodecahedron",)).validate()
    config = from_dict(DemoDataConfig, {"colours": ["red", "blue", "green"], "shapes": ["circle", "star", "heart"],
                                        "held_out_per_colour": 1})
    config.validate()
    assert config.held_out_classes() == ["blue star", "green heart", "red circle"]
