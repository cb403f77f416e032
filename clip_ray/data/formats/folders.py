"""Datasets stored as plain image files beside a caption table or class folders.

- a captions CSV (`image,caption`, several rows per image) next to `images/`, as
  Flickr8k/Flickr30k ship, with an optional split file of image names;
- a COCO captions JSON (`images` [{id, file_name}], `annotations` [{image_id, caption}]);
- an ImageFolder tree (`<class name>/<image>`) for zero-shot classification.

Caption readers yield one sample per caption, reading each image file once for
all its captions; the key is '<image stem>_<caption number>' and meta["image"]
names the image, which is what retrieval evaluation groups captions by.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow.fs as pafs

from clip_ray.data.formats.samples import (
    IMAGE_EXTENSIONS, BadSample, FailureCounts, FailureReason, LabeledImage, Sample, clean_caption, make_key,
)
from clip_ray.storage import basename, join, resolve, under

# An image name mapped to its captions, each with the meta it adds: the in-memory caption table.
CaptionTable = dict[str, list[tuple[str, dict]]]


def _read_text(path: str, filesystem: pafs.FileSystem | None) -> str:
    """A whole text file; undecodable bytes survive as surrogates so each caption is judged alone."""
    fs, inner = resolve(path, filesystem)
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode("utf-8-sig", errors="surrogateescape")


def load_split(path: str | Path, filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Image names listed one per line (blank lines ignored)."""
    return [line.strip() for line in _read_text(str(path), filesystem).splitlines() if line.strip()]


def load_caption_csv(
    path: str | Path,
    filesystem: pafs.FileSystem | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> CaptionTable:
    """Image name -> its captions, in file order. Raises ValueError without the two columns."""
    reader = csv.DictReader(io.StringIO(_read_text(str(path), filesystem), newline=""))
    missing = {image_column, caption_column} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: no column(s) {sorted(missing)} in header {reader.fieldnames}")
    table: CaptionTable = {}
    for row in reader:
        table.setdefault(row[image_column], []).append((row[caption_column], {}))
    return table


def load_coco_captions(path: str | Path, filesystem: pafs.FileSystem | None = None) -> tuple[CaptionTable, list[str]]:
    """(file name -> captions in annotation order, one problem message per orphan annotation)."""
    data = json.loads(_read_text(str(path), filesystem))
    names = {image["id"]: image["file_name"] for image in data["images"]}
    table: CaptionTable = {name: [] for name in names.values()}
    orphans = []
    for annotation in data["annotations"]:
        name = names.get(annotation.get("image_id"))
        if name is None:
            orphans.append(f"annotation {annotation.get('id')} points at unknown image_id {annotation.get('image_id')}")
            continue
        meta = {"image_id": annotation["image_id"], "annotation_id": annotation.get("id")}
        table[name].append((annotation.get("caption"), meta))
    return table, orphans


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def samples_from_table(
    table: CaptionTable, image_names: Iterable[str], images_dir: str, source: str,
    counts: FailureCounts, filesystem: pafs.FileSystem | None,
) -> Iterator[Sample]:
    """One sample per caption of each listed image, reading each image file once."""
    fs, images_root = resolve(images_dir, filesystem)
    for name in image_names:
        captions = table.get(name)
        if not captions:
            counts.reject(FailureReason.MISSING_CAPTION, source, name, "no caption for this image")
            continue
        try:
            image = _read_bytes(fs, join(images_root, name))
            problem = None if image else BadSample(FailureReason.ZERO_BYTE_IMAGE, "0 bytes")
        except OSError as err:
            image, problem = b"", BadSample(FailureReason.MISSING_IMAGE, f"{type(err).__name__}: {err}")
        for number, (text, meta) in enumerate(captions):
            key = make_key(name, number)
            try:
                if problem is not None:
                    raise problem
                caption = clean_caption(text)
            except BadSample as bad:
                counts.reject(bad.reason, source, key, bad.detail)
                continue
            counts.accept()
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else "jpg"
            yield Sample(key=key, image=image, caption=caption, image_ext=ext,
                         meta={"image": name, **meta}, source=source)


def read_caption_csv(
    root: str | Path,
    counts: FailureCounts | None = None,
    filesystem: pafs.FileSystem | None = None,
    captions_file: str = "captions.csv",
    images_dir: str = "images",
    split_file: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> Iterator[Sample]:
    """Samples of a folder of images plus a captions CSV, e.g. Flickr8k; never raises on bad data.

    Paths are relative to `root` unless absolute or URIs. With `split_file`, only
    the images it lists are read, in its order (an image it lists without any
    caption counts as MISSING_CAPTION). A CSV or split file that cannot be read
    counts once as UNREADABLE_SHARD.
    """
    counts = counts if counts is not None else FailureCounts()
    root = str(root)
    source = under(root, captions_file)
    try:
        table = load_caption_csv(source, filesystem, image_column, caption_column)
        names = load_split(under(root, split_file), filesystem) if split_file is not None else list(table)
    except (OSError, ValueError, csv.Error) as err:
        counts.reject(FailureReason.UNREADABLE_SHARD, source, "", f"{type(err).__name__}: {err}")
        return
    yield from samples_from_table(table, names, under(root, images_dir), source, counts, filesystem)


def read_coco_captions(
    annotations_file: str | Path,
    images_dir: str | Path,
    counts: FailureCounts | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> Iterator[Sample]:
    """Samples of a COCO captions JSON over a folder of images; never raises on bad data.

    An annotation whose image_id is not among `images` counts as MISSING_IMAGE,
    an image without annotations as MISSING_CAPTION; a JSON file that cannot be
    read or parsed counts once as UNREADABLE_SHARD. meta carries image_id and
    annotation_id.
    """
    counts = counts if counts is not None else FailureCounts()
    source = str(annotations_file)
    try:
        table, orphans = load_coco_captions(source, filesystem)
    except (OSError, ValueError, KeyError, TypeError) as err:
        counts.reject(FailureReason.UNREADABLE_SHARD, source, "", f"{type(err).__name__}: {err}")
        return
    for problem in orphans:
        counts.reject(FailureReason.MISSING_IMAGE, source, "", problem)
    yield from samples_from_table(table, list(table), str(images_dir), source, counts, filesystem)


def list_image_folder(
    root: str | Path, filesystem: pafs.FileSystem | None = None,
) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names sorted, [(image path, class index)] sorted by class then path).

    A class is a direct subfolder of `root`; its images are the files below it
    (at any depth) with an image extension.
    """
    fs, inner = resolve(root, filesystem)
    inner = inner.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    classes = sorted(basename(i.path) for i in infos if i.type == pafs.FileType.Directory
                     and i.path.rsplit("/", 1)[0] == inner)
    index = {name: i for i, name in enumerate(classes)}
    images = []
    for info in infos:
        relative = info.path[len(inner) + 1:]
        class_name = relative.split("/", 1)[0]
        if info.is_file and "/" in relative and info.path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            images.append((info.path, index[class_name]))
    images.sort(key=lambda item: (item[1], item[0]))
    return classes, images


def read_image_folder(
    root: str | Path, counts: FailureCounts | None = None, filesystem: pafs.FileSystem | None = None,
) -> Iterator[LabeledImage]:
    """(image bytes, class index, class name) for each image under an ImageFolder tree; never raises on bad data.

    Paths in `source` are inside the resolved filesystem. A root that cannot be
    listed counts once as UNREADABLE_SHARD, an unreadable file as MISSING_IMAGE.
    """
    counts = counts if counts is not None else FailureCounts()
    try:
        fs, _ = resolve(root, filesystem)
        classes, images = list_image_folder(root, filesystem)
    except OSError as err:
        counts.reject(FailureReason.UNREADABLE_SHARD, str(root), "", f"{type(err).__name__}: {err}")
        return
    yield from read_listed_images(images, classes, fs, counts)


def read_listed_images(
    images: Iterable[tuple[str, int]], classes: Sequence[str], filesystem: pafs.FileSystem, counts: FailureCounts,
) -> Iterator[LabeledImage]:
    """The images of a `list_image_folder` listing (or a slice of it), read from `filesystem`; an unreadable
    file counts as MISSING_IMAGE, an empty one as ZERO_BYTE_IMAGE."""
    fs = filesystem
    for path, class_index in images:
        key = make_key(f"{classes[class_index]}/{basename(path)}")
        try:
            image = _read_bytes(fs, path)
        except OSError as err:
            counts.reject(FailureReason.MISSING_IMAGE, path, key, f"{type(err).__name__}: {err}")
            continue
        if not image:
            counts.reject(FailureReason.ZERO_BYTE_IMAGE, path, key, "0 bytes")
            continue
        counts.accept()
        yield LabeledImage(key=key, image=image, class_index=class_index, class_name=classes[class_index],
                           image_ext=path.rsplit(".", 1)[-1].lower(), source=path)
