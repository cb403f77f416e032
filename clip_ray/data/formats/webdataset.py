"""WebDataset tar shards in the img2dataset layout: KEY.jpg, KEY.txt, KEY.json.

A sample is the run of consecutive tar members sharing a key (the member name up
to the first '.' of its base name). Shards are read as streams, so a shard on s3://
or gs:// is never downloaded whole and never needs a seekable file.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from clip_ray.data.formats.samples import (
    IMAGE_EXTENSIONS, BadSample, FailureCounts, FailureReason, Sample, decode_caption, parse_meta,
)
from clip_ray.storage import AtomicFile, ClosesOrAborts, join, resolve

# Fixed member metadata: writing the same samples twice gives byte-identical shards.
_MEMBER_MTIME = 0
_MEMBER_MODE = 0o644


class ShardWriter(ClosesOrAborts):
    """Writes samples into numbered tar shards `{prefix}{index:05d}.tar` under `out_dir`.

    Each shard is written to `NAME.tar.tmp` and renamed when it is full (or on
    close), so a crash leaves no half shard under a shard's name and a re-run
    overwrites both finished shards and a crashed run's temporary file. If the
    `with` block raises, the shard in progress is discarded.
    """

    def __init__(
        self,
        out_dir: str | Path,
        samples_per_shard: int = 1000,
        prefix: str = "",
        start_index: int = 0,
        filesystem: pafs.FileSystem | None = None,
    ):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        self.out_dir = str(out_dir)
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.next_index = start_index
        self.fs, self._fs_dir = resolve(self.out_dir, filesystem)
        self.fs.create_dir(self._fs_dir, recursive=True)
        self.shards: list[str] = []
        self._file: AtomicFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._keys: set[str] = set()

    def _open_shard(self) -> None:
        self._name = f"{self.prefix}{self.next_index:05d}.tar"
        self.next_index += 1
        self._file = AtomicFile(join(self._fs_dir, self._name), self.fs)
        self._tar = tarfile.open(fileobj=self._file.stream, mode="w|", format=tarfile.PAX_FORMAT)
        self._keys = set()

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), _MEMBER_MTIME, _MEMBER_MODE
        self._tar.addfile(info, io.BytesIO(data))

    def _finish_shard(self) -> None:
        self._tar.close()
        self._file.commit()
        self.shards.append(join(self.out_dir, self._name))
        self._tar = self._file = None

    def write(self, key: str, image: bytes, caption: str, image_ext: str = "jpg", meta: dict | None = None) -> None:
        """Adds KEY.<image_ext>, KEY.txt and, when `meta` is given, KEY.json."""
        image_ext = image_ext.lower().lstrip(".")
        if image_ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_ext {image_ext!r} is not one of {IMAGE_EXTENSIONS}")
        if not key or "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"key {key!r} must be non-empty with no '.' (a '.' starts the extension)")
        if self._tar is None:
            self._open_shard()
        if key in self._keys:
            raise ValueError(f"key {key!r} written twice into shard {self._name}")
        self._keys.add(key)
        self._add_member(f"{key}.{image_ext}", bytes(image))
        self._add_member(f"{key}.txt", caption.encode("utf-8"))
        if meta is not None:
            self._add_member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        if len(self._keys) == self.samples_per_shard:
            self._finish_shard()

    def close(self) -> list[str]:
        """Finishes the last shard; returns every shard path written, in the form out_dir was given."""
        if self._tar is not None:
            self._finish_shard()
        return list(self.shards)

    def abort(self) -> None:
        """Drops the shard in progress, leaving finished shards in place."""
        if self._tar is None:
            return
        try:
            self._tar.close()  # else its buffer is flushed later, into a closed stream
        finally:
            self._file.discard()
            self._tar = self._file = None


def _split_member_name(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'); the key ends at the base name's first '.'."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _sample_from_members(key: str, members: dict[str, bytes], source: str, counts: FailureCounts) -> Sample | None:
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        counts.reject(FailureReason.MISSING_IMAGE, source, key, f"members: {sorted(members)}")
        return None
    if "txt" not in members:
        counts.reject(FailureReason.MISSING_CAPTION, source, key, f"members: {sorted(members)}")
        return None
    image = members[image_ext]
    if len(image) == 0:
        counts.reject(FailureReason.ZERO_BYTE_IMAGE, source, key, f"{key}.{image_ext} is empty")
        return None
    try:
        caption = decode_caption(members["txt"])
    except BadSample as bad:
        counts.reject(bad.reason, source, key, bad.detail)
        return None
    counts.accept()
    return Sample(key=key, image=image, caption=caption, image_ext=image_ext,
                  meta=parse_meta(members.get("json")), source=source)


def read_tar_shard(
    path: str | Path,
    counts: FailureCounts | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> Iterator[Sample]:
    """Yields the usable samples of one tar shard; never raises on bad data.

    Bad samples (no image, no caption, empty image, empty or non-UTF-8 caption)
    are counted in `counts` under their reason. A shard that cannot be opened or
    breaks off mid-way counts once as UNREADABLE_SHARD, after the samples read
    before the break; the sample the break cut into is dropped uncounted.
    Images are not decoded here (see `samples.decode_image`).
    """
    counts = counts if counts is not None else FailureCounts()
    source = str(path)
    key, members = None, {}
    try:
        fs, inner = resolve(source, filesystem)
        with fs.open_input_stream(inner) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member_name(member.name)
                if member_key != key:
                    if key is not None:
                        sample = _sample_from_members(key, members, source, counts)
                        if sample is not None:
                            yield sample
                    key, members = member_key, {}
                # Read after yielding the previous sample, so a break here loses only this one.
                data = tar.extractfile(member).read()
                members.setdefault(ext, data)
    except (OSError, tarfile.TarError, EOFError, ValueError) as err:
        counts.reject(FailureReason.UNREADABLE_SHARD, source, "", f"{type(err).__name__}: {err}")
        return
    if key is not None:
        sample = _sample_from_members(key, members, source, counts)
        if sample is not None:
            yield sample
