"""Where data lives: pyarrow filesystems, shard patterns, listings, atomic writes.

Every reader and writer takes a path that is either a local path or a URI that
`pyarrow.fs.FileSystem.from_uri` understands (s3://, gs://, hdfs://, file://),
or a path inside an explicitly given `filesystem`. A URI listed here comes back
as a URI, so it can be shipped to a Ray task on another node and resolved there
again.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import re
from pathlib import Path
from typing import Sequence

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@functools.lru_cache(maxsize=64)
def _filesystem_of(root_uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(root_uri)


def is_uri(path: str | Path) -> bool:
    """A scheme://... location (s3://, gs://, file://, http://) rather than a plain local path."""
    return _SCHEME.match(str(path)) is not None


def local_absolute(path: str) -> str:
    """A local path made absolute against this process's working directory; a URI as it is."""
    return path if is_uri(path) else str(Path(path).expanduser().absolute())


def resolve(path: str | Path, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, a URI, or a path in `filesystem`.

    Filesystems are cached per scheme://authority: building an S3 one can cost a
    request (the bucket's region), which a reader called once per shard should
    not pay per shard.
    """
    path = str(path)
    if filesystem is not None:
        return filesystem, path
    match = _SCHEME.match(path)
    if match is None:
        return pafs.LocalFileSystem(), str(Path(path).absolute())
    if match.group(1) == "file":
        return pafs.LocalFileSystem(), path[len("file://"):]
    authority, slash, rest = path[match.end():].partition("/")
    if not authority or "?" in path or "%" in path:  # options or escapes: let pyarrow parse the whole URI
        return pafs.FileSystem.from_uri(path)
    fs, root = _filesystem_of(f"{match.group(1)}://{authority}")
    return fs, root.rstrip("/") + slash + rest


def join(base: str, name: str) -> str:
    """Joins with '/', which every pyarrow filesystem and URI uses (local paths too)."""
    return base.rstrip("/") + "/" + name


def under(root: str | Path, path: str | Path) -> str:
    """`path` as given when it is absolute or a URI, else joined to `root`."""
    path = str(path)
    return path if path.startswith("/") or is_uri(path) else join(str(root), path)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _split_top_level(body: str) -> list[str]:
    """Splits a brace body at commas that are not inside a nested brace group."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def _expand_range(body: str) -> list[str] | None:
    match = _RANGE.match(body)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    lo, hi = int(first), int(last)
    if hi < lo:
        raise ValueError(f"brace range {{{body}}} runs backwards")
    # Zero padding: "{00000..00127}" keeps five digits, "{0..127}" keeps none.
    width = max(len(first), len(last)) if first.startswith("0") and len(first) > 1 else 0
    return [str(i).zfill(width) for i in range(lo, hi + 1)]


def expand_shard_pattern(pattern: str) -> list[str]:
    """Expands shell-style braces, in order: 'a/{000..002}.tar' and 'x-{train,val}.tar'.

    Several groups multiply out left to right; groups nest. Zero padding of a
    numeric range follows its first bound. A pattern without braces is itself.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in shard pattern {pattern!r}")
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")
    body = pattern[start + 1 : end]
    choices = _expand_range(body)
    if choices is None:
        choices = [c for part in _split_top_level(body) for c in expand_shard_pattern(part)]
    head, tails = pattern[:start], expand_shard_pattern(pattern[end + 1 :])
    return [head + choice + tail for choice, tail in itertools.product(choices, tails)]


def _with_scheme(original: str, fs_path: str) -> str:
    """Maps a path listed inside a filesystem back to the form `original` used."""
    match = _SCHEME.match(original)
    if match is None:
        return fs_path
    # s3://bucket/key lists as "bucket/key"; hdfs://host:port/p as "/p"; file:///p as "/p".
    if fs_path.startswith("/"):
        authority = original[match.end():].split("/", 1)[0]
        return f"{match.group(1)}://{authority}{fs_path}"
    return f"{match.group(1)}://{fs_path}"


def list_shards(
    sources: str | Path | Sequence[str | Path],
    extensions: Sequence[str] = (".tar",),
    filesystem: pafs.FileSystem | None = None,
) -> list[str]:
    """Turns patterns, directories and globs into a list of shard paths, in order.

    - 'dir/{00000..00127}.tar' expands without touching storage: a missing shard
      surfaces later as an unreadable shard, so a listing over 100k cloud shards
      costs no per-file request;
    - a directory lists its files ending in `extensions` (recursively, sorted);
    - a name with '*' or '?' matches files in its directory (sorted);
    - anything else is taken as a file path as given.
    Duplicates are dropped, keeping the first occurrence.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    found: list[str] = []
    for source in sources:
        source = str(source)
        expanded = expand_shard_pattern(source)
        if len(expanded) > 1:
            found.extend(expanded)
            continue
        fs, path = resolve(source, filesystem)
        if any(char in basename(path) for char in "*?["):
            parent = path.rstrip("/").rsplit("/", 1)[0]
            pattern = basename(path)
            infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
            names = sorted(i.path for i in infos if i.is_file and fnmatch.fnmatch(basename(i.path), pattern))
            found.extend(_with_scheme(source, name) if filesystem is None else name for name in names)
        elif fs.get_file_info(path).type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            names = sorted(i.path for i in infos if i.is_file and i.path.endswith(tuple(extensions)))
            found.extend(_with_scheme(source, name) if filesystem is None else name for name in names)
        else:
            found.append(source)
    return list(dict.fromkeys(found))


def temporary_name(path: str) -> str:
    """The fixed in-progress name of `path`: a re-run overwrites a crashed run's leftover."""
    return path + ".tmp"


class ClosesOrAborts:
    """The with-statement of a writer with close() and abort(): a block that raises leaves no half output.

    close() on success; abort() when the block raised, so the exception propagates
    and what was being written is dropped rather than committed.
    """

    def close(self):
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class AtomicFile(ClosesOrAborts):
    """An output stream whose bytes appear at `path` only on `commit()`.

    They go to `path + '.tmp'` first and are moved into place at the end, so
    readers never see half a file, and a re-run overwrites both the finished file
    and a crashed run's leftover. As a context manager it commits on success and
    discards on error.
    """

    def __init__(self, path: str, filesystem: pafs.FileSystem | None = None):
        self.fs, self.path = resolve(path, filesystem)
        self.tmp = temporary_name(self.path)
        self.stream = self.fs.open_output_stream(self.tmp)

    def commit(self) -> None:
        self.stream.close()
        self.fs.move(self.tmp, self.path)  # replaces an older file: a rename locally, copy+delete on object stores

    def discard(self) -> None:
        try:
            self.stream.close()
        finally:
            try:
                self.fs.delete_file(self.tmp)
            except OSError:
                pass

    # The with-statement's names for them (ClosesOrAborts).
    close, abort = commit, discard


def write_file(path: str, data: bytes) -> None:
    """`data` at `path` (local or a URI), whole or not at all; missing parent folders are made."""
    fs, fs_path = resolve(path)
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with AtomicFile(fs_path, fs) as file:
        file.stream.write(data)
