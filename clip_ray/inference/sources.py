"""What every way of reading a model source shares: the error it raises, files and their digests, tokenizers."""

from __future__ import annotations

import hashlib
from pathlib import Path

from clip_ray.storage import basename, is_uri, resolve


class ModelSourceError(FileNotFoundError):
    """A model source that cannot be used; the message names it and says what to give instead."""


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file, local or at a URI."""
    fs, inner = resolve(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(inner) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def local_copy(path: str, scratch: Path) -> str:
    """A local file holding `path` (itself when local)."""
    if not is_uri(path):
        return path
    fs, inner = resolve(path)
    target = scratch / basename(path)
    with fs.open_input_stream(inner) as stream, open(target, "wb") as out:
        while chunk := stream.read(1 << 24):
            out.write(chunk)
    return str(target)


def folder_tokenizer(folder: Path) -> str | None:
    try:
        return tokenizer_file(str(folder))
    except ModelSourceError:
        return None


def tokenizer_file(path: str) -> str:
    """The tokenizer file `path` names: itself, or the tokenizer.json / CLIP merges file in a folder."""
    candidate = Path(path)
    if candidate.is_dir():
        names = ["tokenizer.json", "bpe_simple_vocab_16e6.txt.gz", *sorted(p.name for p in candidate.glob("*.txt.gz"))]
        for name in names:
            if (candidate / name).is_file():
                return str(candidate / name)
        raise ModelSourceError(f"{path}: no tokenizer.json or CLIP merges file in this folder")
    if not candidate.is_file():
        raise ModelSourceError(f"tokenizer {path}: no such local file; pass --tokenizer with the model's own")
    return str(candidate)
