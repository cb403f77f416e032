"""Demo data that needs no download: drawn scenes of coloured shapes with varied captions.

A scene holds one to three objects of one colour and one shape kind on a solid,
gradient or noisy background. Its caption names colour and shape, and at random
the count, size, position and background, through dozens of sentence frames and a
few synonyms, so a text encoder has to learn words rather than template ids.

The class space is colour x shape. Some combinations are held out of training
(Latin-square style: each colour loses a few shapes, each shape a few colours), so
zero-shot accuracy on them measures composition: the model saw "red" and "star",
never a red star. Everything is a pure function of the seed: sample i of a split
has its own generator, so shards are byte-identical however they are produced.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clip_ray.config import DemoDataConfig
from clip_ray.data.formats import ShardWriter

# Hues (degrees) of the colours a scene may have; the default six sit about 60 degrees apart.
HUES: dict[str, float] = {
    "red": 0, "orange": 28, "yellow": 55, "green": 120, "cyan": 185, "blue": 228, "purple": 278, "pink": 325,
}
# The first word is the class name; the others appear now and then in captions.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",),
    "cyan": ("cyan", "turquoise"), "blue": ("blue",), "purple": ("purple", "violet"), "pink": ("pink", "magenta"),
}
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("dot", "dots")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "heart": (("heart", "hearts"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "medium": ("medium-sized", "medium", "mid-sized"),
              "large": ("large", "big", "huge")}
# Radius of an object as a fraction of the image side.
SIZE_RADIUS = {"small": (0.08, 0.11), "medium": (0.13, 0.17), "large": (0.21, 0.27)}
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "2", "a pair of"), 3: ("three", "3", "a group of three")}
# Background names and grey levels; coloured backgrounds are muted versions of the palette.
NEUTRALS = {"white": 238, "light gray": 196, "gray": 128, "dark gray": 72, "black": 22}

POSITION_PHRASES = {
    "corner": ("in the {} corner", "near the {}", "at the {}", "in the {} area"),
    "top": ("at the top", "near the top", "along the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom", "in the lower part"),
    "left": ("on the left", "on the left side", "to the left"),
    "right": ("on the right", "on the right side", "to the right"),
    "center": ("in the center", "in the middle", "in the centre", "at the center"),
}
# Sentence frames: {np} names count, size, colour and shape; {where}, {bg}, {bg_name} are optional facts.
CAPTION_FRAMES: tuple[str, ...] = (
    "{np}", "{np}.", "a photo of {np}.", "a picture of {np}", "an image showing {np}",
    "an image of {np} {bg}", "{np} {bg}", "{np} {where}", "{np}, {where}", "{np} {where}, {bg}",
    "{np} {bg}, {where}", "{where} there {be} {np}", "there {be} {np} {where}", "there {be} {np} {bg}",
    "a drawing of {np}", "a simple drawing of {np} {bg}", "clip art of {np}", "a rendering of {np} {where}",
    "you can see {np} {where}", "{np} drawn {bg}", "a {bg_name} background with {np} on it",
    "a {bg_name} scene with {np}", "{np} placed {where}", "this picture shows {np}",
    "this image contains {np} {where}", "the picture has {np} {bg}", "on a {bg_name} background: {np}",
    "{np} sitting {where}", "just {np}", "{np} and nothing else", "a close-up of {np}",
    "a diagram with {np} {where}", "an illustration of {np}, {bg}", "{np} in front of a {bg_name} background",
    "a graphic of {np} {where} {bg}",
)


def class_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


# --------------------------------------------------------------------------- drawing


def _unit_polygon(shape: str) -> np.ndarray:
    """Outline of `shape` inside the unit disc, as [N, 2] points (y grows downwards)."""
    if shape == "triangle":
        angles = np.radians([-90, 30, 150])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        angles = np.radians(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "square":
        return np.array([[-0.75, -0.75], [0.75, -0.75], [0.75, 0.75], [-0.75, 0.75]])
    if shape == "diamond":
        return np.array([[0.0, -1.0], [0.68, 0.0], [0.0, 1.0], [-0.68, 0.0]])
    if shape == "cross":
        a, t = 0.95, 0.32
        return np.array([[-t, -a], [t, -a], [t, -t], [a, -t], [a, t], [t, t],
                         [t, a], [-t, a], [-t, t], [-a, t], [-a, -t], [-t, -t]])
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], axis=1) / 17.0
    raise ValueError(f"no outline for shape {shape!r}")


_OUTLINES = {shape: _unit_polygon(shape) for shape in SHAPE_WORDS if shape != "circle"}
# Degrees a shape may turn: a triangle or star anywhere, a square only slightly, else it reads as a diamond.
_MAX_TURN = {"triangle": 180.0, "star": 180.0, "square": 10.0, "diamond": 10.0, "cross": 10.0, "heart": 12.0}
_SUPERSAMPLE = 4


def _rgb_from_hue(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue % 360) / 360, saturation, value)) * 255


def _background(rng: np.random.Generator, size: int, object_colour: str, palette: tuple[str, ...]):
    """A background as a float [size, size, 3] array, its name and its style."""
    others = [c for c in palette if c != object_colour]
    if rng.random() < 0.3 and others:
        name = str(rng.choice(others))
        base = 0.5 * _rgb_from_hue(HUES[name], 0.9, 0.85) + 0.5 * 110
    else:
        name = str(rng.choice(list(NEUTRALS)))
        base = np.full(3, float(NEUTRALS[name]))
    base = base + rng.normal(0, 6, 3)
    style = str(rng.choice(["solid", "gradient", "noise"], p=[0.4, 0.3, 0.3]))
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.linspace(-1, 1, size, dtype=np.float32)
        along = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
        image = image * (1 + 0.22 * along[:, :, None])
    elif style == "noise":
        image = image + rng.normal(0, 10, (size, size, 3)).astype(np.float32)
    return image, name, style


def _place(rng: np.random.Generator, count: int, radius: float, region: tuple[float, float, float, float]):
    """Centres (fractions of the side) for `count` objects that neither overlap nor leave the image."""
    x0, y0, x1, y1 = region
    margin = 1.15 * radius
    lo_x, hi_x = max(x0, margin), min(x1, 1 - margin)
    lo_y, hi_y = max(y0, margin), min(y1, 1 - margin)
    for _ in range(200):
        centres = []
        for _ in range(count):
            for _ in range(50):
                c = (rng.uniform(lo_x, max(lo_x, hi_x)), rng.uniform(lo_y, max(lo_y, hi_y)))
                if all(math.dist(c, d) > 2.3 * radius for d in centres):
                    centres.append(c)
                    break
        if len(centres) == count:
            return centres
    raise RuntimeError(f"cannot place {count} objects of radius {radius:.2f} in {region}")


_GROUP_REGIONS = {None: (0, 0, 1, 1), "top": (0, 0, 1, 0.5), "bottom": (0, 0.5, 1, 1),
                  "left": (0, 0, 0.5, 1), "right": (0.5, 0, 1, 1)}
_ROWS, _COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")


def _layout(rng: np.random.Generator):
    """Count, size word, radius, named position (or None) and object centres of one scene."""
    count = int(rng.integers(1, 4))
    size = str(rng.choice(["small", "medium", "large"][: 4 - count]))
    radius = float(rng.uniform(*SIZE_RADIUS[size]))
    if count == 1:
        row, col = int(rng.integers(3)), int(rng.integers(3))
        region = (col / 3, row / 3, (col + 1) / 3, (row + 1) / 3)
        names = [n for n in (_ROWS[row], _COLUMNS[col]) if n not in ("middle", "center")]
        position = " ".join(names) or "center"
    else:
        position = [None, "top", "bottom", "left", "right"][int(rng.integers(5))]
        region = _GROUP_REGIONS[position]
    return count, size, radius, position, _place(rng, count, radius, region)


def render_scene(rng: np.random.Generator, combo: tuple[str, str], size: int = 64,
                 palette: tuple[str, ...] = tuple(HUES)) -> tuple[Image.Image, dict]:
    """Draws one scene of `combo` = (colour, shape); returns the RGB image and its attributes.

    Attributes hold everything a caption may mention, plus each object's box in pixels
    (the box of its enclosing circle, whose centre lies inside every shape).
    """
    colour, shape = combo
    count, size_word, radius, position, centres = _layout(rng)
    background, bg_name, bg_style = _background(rng, size, colour, palette)
    hue = HUES[colour] + rng.uniform(-6, 6)
    fill = _rgb_from_hue(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))

    # Outlines are drawn at a higher resolution and shrunk, which anti-aliases the edges.
    canvas = size * _SUPERSAMPLE
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    boxes = []
    for cx, cy in centres:
        r = radius * canvas
        x, y = cx * canvas, cy * canvas
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        else:
            turn = np.radians(rng.uniform(-_MAX_TURN[shape], _MAX_TURN[shape]))
            rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
            points = _OUTLINES[shape] @ rotation.T * r + (x, y)
            draw.polygon([tuple(p) for p in points], fill=255)
        boxes.append([round(v, 2) for v in ((cx - radius) * size, (cy - radius) * size,
                                            (cx + radius) * size, (cy + radius) * size)])
    alpha = np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32)[:, :, None] / 255
    pixels = background * (1 - alpha) + fill.astype(np.float32) * alpha
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    attributes = {"colour": colour, "shape": shape, "class_name": class_name(colour, shape), "count": count,
                  "size": size_word, "position": position, "background": bg_name, "background_style": bg_style,
                  "boxes": boxes}
    return image, attributes


# --------------------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, words: tuple, main_weight: float = 0.75):
    """The first word most of the time, a synonym otherwise."""
    if len(words) == 1 or rng.random() < main_weight:
        return words[0]
    return words[int(rng.integers(1, len(words)))]


def _noun_phrase(rng: np.random.Generator, attributes: dict) -> str:
    """'two small red stars', or with the colour after the noun: 'two stars, all red'."""
    count = attributes["count"]
    colour = _pick(rng, COLOUR_WORDS[attributes["colour"]])
    noun = _pick(rng, SHAPE_WORDS[attributes["shape"]])[0 if count == 1 else 1]
    size = _pick(rng, SIZE_WORDS[attributes["size"]], 0.5) if rng.random() < 0.5 else None
    determiner = _pick(rng, COUNT_WORDS[count], 0.6)
    if rng.random() < 0.75:
        return " ".join(w for w in (determiner, size, colour, noun) if w)
    tails = ["in {}", "coloured {}", "colored {}", "that is {}" if count == 1 else "that are {}"]
    if count > 1:
        tails += [", all {}", ", each one {}"]
    tail = str(rng.choice(tails)).format(colour)
    return " ".join(w for w in (determiner, size, noun) if w) + ("" if tail.startswith(",") else " ") + tail


def _where(rng: np.random.Generator, position: str | None) -> str | None:
    if position is None:
        return None
    kind = "corner" if " " in position else position
    return str(rng.choice(POSITION_PHRASES[kind])).format(position.replace(" ", rng.choice([" ", "-"])))


def _background_name(rng: np.random.Generator, attributes: dict) -> str:
    name, style = attributes["background"], attributes["background_style"]
    if style == "gradient" and rng.random() < 0.6:
        return f"{name} gradient" if rng.random() < 0.5 else f"shaded {name}"
    if style == "noise" and rng.random() < 0.6:
        return f"{rng.choice(['noisy', 'grainy', 'speckled'])} {name}"
    if style == "solid" and rng.random() < 0.3:
        return f"plain {name}"
    return name


def caption_scene(rng: np.random.Generator, attributes: dict) -> str:
    """One of many phrasings of a scene; colour and shape are always named, the rest at random."""
    where = _where(rng, attributes["position"])
    frames = [f for f in CAPTION_FRAMES if where is not None or "{where}" not in f]
    frame = frames[int(rng.integers(len(frames)))]
    bg_name = _background_name(rng, attributes)
    bg = str(rng.choice(["on a {} background", "against a {} backdrop", "over a {} background",
                         "on top of a {} background"])).format(bg_name)
    text = frame.format(np=_noun_phrase(rng, attributes), where=where, bg=bg, bg_name=bg_name,
                        be="is" if attributes["count"] == 1 else "are")
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


# --------------------------------------------------------------------------- datasets on disk

MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = "clip-ray-demo-1"
_SPLIT_CODES = {"train": 0, "val": 1, "zeroshot": 2}


@dataclass(frozen=True)
class DemoDataset:
    """Where a generated demo data set lives; paths are absolute."""

    root: str
    train_shards: list[str]
    val_shards: list[str]
    # ImageFolder of the held-out combinations: the zero-shot generalisation test.
    zeroshot_dir: str
    # ImageFolder of combinations seen in training, same count per class, for comparison.
    zeroshot_seen_dir: str
    # Held-out class names, sorted: the label order of `zeroshot_dir` as an ImageFolder.
    class_names: list[str]
    seen_class_names: list[str]
    # Zero-shot top-1 accuracy of guessing among `class_names`.
    chance_level: float
    manifest_path: str
    config: DemoDataConfig = field(repr=False)


def _identity(config: DemoDataConfig) -> dict:
    """The config fields that decide the bytes (not how many processes drew them), JSON-shaped."""
    fields = asdict(config)
    fields.pop("num_workers")
    return json.loads(json.dumps(fields))


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def draw_sample(config: DemoDataConfig, split: str, index: int, combos: list[tuple[str, str]]):
    """Sample `index` of `split` as (jpeg bytes, caption, attributes); a function of the seed alone.

    The colour-shape pair is drawn from `combos`: one pair forces it.
    """
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index])
    combo = combos[int(rng.integers(len(combos)))]
    image, attributes = render_scene(rng, combo, config.image_size, config.colours)
    caption = caption_scene(rng, attributes)
    return _jpeg(image, config.jpeg_quality), caption, attributes


def _write_shard(task: tuple) -> list[str]:
    """Writes samples [start, stop) of a split as the shard numbered `shard_index`."""
    config, split, out_dir, shard_index, start, stop = task
    combos = config.seen_combos() if split == "train" else config.combos()
    with ShardWriter(out_dir, config.samples_per_shard, start_index=shard_index) as writer:
        for index in range(start, stop):
            image, caption, attributes = draw_sample(config, split, index, combos)
            writer.write(f"{split}{index:08d}", image, caption, meta=attributes)
    return writer.shards


def _write_class_folder(task: tuple) -> list[str]:
    """Writes the zero-shot images of one class into `folder/<class name>/NNNN.jpg`."""
    config, combo, folder = task
    class_dir = Path(folder) / class_name(*combo)
    class_dir.mkdir(parents=True, exist_ok=True)
    index_base = config.combos().index(combo) * config.num_zeroshot_per_class
    for k in range(config.num_zeroshot_per_class):
        image, _, _ = draw_sample(config, "zeroshot", index_base + k, [combo])
        (class_dir / f"{k:04d}.jpg").write_bytes(image)
    return [str(class_dir)]


def _run(tasks: list, num_workers: int) -> list:
    """Runs `(function, task)` pairs in order, in a pool of fresh processes when asked for more than one.

    Like any spawned pool, this re-imports the caller's main script in each child:
    a script calling it with num_workers != 1 needs an `if __name__ == "__main__":` guard.
    """
    if num_workers <= 1:
        return [function(task) for function, task in tasks]
    import multiprocessing

    # spawn, not fork: the caller may be a Ray worker with threads that a fork would copy mid-lock.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        pending = [pool.apply_async(function, (task,)) for function, task in tasks]
        return [p.get() for p in pending]


def _load_manifest(root: Path, config: DemoDataConfig) -> DemoDataset | None:
    """The data set a finished earlier run left for this same config, else None."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != _MANIFEST_FORMAT or manifest.get("config") != _identity(config):
        return None
    absolute = {name: [str(root / p) for p in manifest[name]] for name in ("train_shards", "val_shards")}
    dirs = {name: str(root / manifest[name]) for name in ("zeroshot_dir", "zeroshot_seen_dir")}
    if not all(Path(p).is_file() for p in absolute["train_shards"] + absolute["val_shards"]):
        return None
    if not all(Path(d).is_dir() for d in dirs.values()):
        return None
    return DemoDataset(root=str(root), **absolute, **dirs, class_names=manifest["class_names"],
                       seen_class_names=manifest["seen_class_names"], chance_level=manifest["chance_level"],
                       manifest_path=str(root / MANIFEST_NAME), config=config)


def _shard_tasks(config: DemoDataConfig, split: str, count: int, out_dir: Path) -> list:
    step = config.samples_per_shard
    return [(_write_shard, (config, split, str(out_dir), i, start, min(start + step, count)))
            for i, start in enumerate(range(0, count, step))]


def generate_demo_data(out_dir: str | Path, config: DemoDataConfig | None = None) -> DemoDataset:
    """Draws train and val shards plus zero-shot ImageFolders under `out_dir`, or reuses them.

    The manifest is written last, by rename: its presence with the same config means
    a finished run, so a second call returns at once, and a crashed run is redone.
    A lock file keeps concurrent callers (say, several workers on one node) from
    drawing into the same directory at the same time.
    """
    import fcntl

    config = config or DemoDataConfig()
    config.validate()
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _load_manifest(root, config)
        if found is not None:
            return found
        started = time.perf_counter()
        (root / MANIFEST_NAME).unlink(missing_ok=True)
        for part in ("train", "val", "zeroshot"):
            shutil.rmtree(root / part, ignore_errors=True)

        held_out = config.held_out_classes()
        seen = sorted(class_name(*c) for c in config.seen_combos())
        folders = {"unseen": root / "zeroshot" / "unseen", "seen": root / "zeroshot" / "seen"}
        shard_tasks = _shard_tasks(config, "train", config.num_train, root / "train")
        shard_tasks += _shard_tasks(config, "val", config.num_val, root / "val")
        folder_tasks = [(_write_class_folder, (config, c, str(folders["unseen" if class_name(*c) in held_out else "seen"])))
                        for c in config.combos()]
        workers = config.num_workers if config.num_workers > 0 else min(os.cpu_count() or 1, 8)
        results = _run(shard_tasks + folder_tasks, workers)
        shards = [Path(p).relative_to(root).as_posix() for done in results[: len(shard_tasks)] for p in done]
        manifest = {
            "format": _MANIFEST_FORMAT,
            "config": _identity(config),
            "train_shards": [p for p in shards if p.startswith("train/")],
            "val_shards": [p for p in shards if p.startswith("val/")],
            "zeroshot_dir": "zeroshot/unseen",
            "zeroshot_seen_dir": "zeroshot/seen",
            "class_names": held_out,
            "seen_class_names": seen,
            "chance_level": 1 / len(held_out),
            "generation_seconds": round(time.perf_counter() - started, 2),
        }
        temporary = root / f"{MANIFEST_NAME}.tmp"
        temporary.write_text(json.dumps(manifest, indent=2))
        os.replace(temporary, root / MANIFEST_NAME)
        return _load_manifest(root, config)
