"""One demo scene: coloured shapes drawn on a background, and a caption that describes it.

A scene holds one to three objects of one colour and one shape kind on a solid,
gradient or noisy background. Its caption names colour and shape, and at random
the count, size, position and background, through dozens of sentence frames and a
few synonyms, so a text encoder has to learn words rather than template ids.

Both take the caller's generator and draw from nothing else, so a scene is a
pure function of the generator's seed; clip_ray.data.demo.synthetic turns them into
data sets on disk.
"""

from __future__ import annotations

import colorsys
import math
import re

import numpy as np
from PIL import Image, ImageDraw

from clip_ray.config.data import DEMO_COLOURS, DEMO_SHAPES

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
# A demo config is checked against the config's word lists; these tables must draw every one of them.
assert tuple(HUES) == tuple(COLOUR_WORDS) == DEMO_COLOURS and tuple(SHAPE_WORDS) == DEMO_SHAPES

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
