"""Text tokenizers: OpenAI CLIP's byte-level BPE, and a BPE trained on your own captions.

Both schemes share one pipeline:

    clean (ftfy, HTML unescape, whitespace folding, lower-case)
      -> split into words with a regex (Python)
      -> each word: byte-level characters -> BPE merges (the `tokenizers` Rust model)
      -> [sot] + ids + [eot] + pad(0) up to the context length

Captions repeat the same few thousand words endlessly, so the ids of every word are
cached in a plain dict: a caption then costs one regex pass and a few dict look-ups.
On Flickr8k this beats `tokenizers.encode_batch` several times over, even with its
threads (its per-character offset bookkeeping dominates on short texts); `tokenizers`
still does what it is best at: the merges, training, and the tokenizer.json format.

The CLIP scheme needs the merges file `bpe_simple_vocab_16e6.txt.gz` that OpenAI's
CLIP and OpenCLIP ship; clip-ray neither ships nor downloads it. Given it, the ids are
exactly those of `open_clip.tokenize`. ftfy is a required dependency, not an optional
one: without it a mis-encoded caption ("cafÃ©") would tokenize differently from OpenAI's
tokenizer, silently.
"""

from __future__ import annotations

import gzip
import html
import json
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex
import torch
from tokenizers import Regex as RustRegex
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

DEFAULT_CONTEXT_LENGTH = 77
PAD_TOKEN_ID = 0
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
PAD_TOKEN = "<pad>"  # only the trained scheme has a token of its own for padding

CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 bytes</w> + 48,894 merges + sot + eot
CLIP_MERGES_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
TRAINED_FILENAME = "tokenizer.json"
END_OF_WORD = "</w>"

# CLIP's words: the special tokens, English contractions, runs of letters, single
# digits, runs of anything else that is not whitespace.
CLIP_WORD_PATTERN = regex.compile(
    rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)
# GPT-2's words, as the `tokenizers` ByteLevel pre-tokenizer splits them: a word
# carries its leading space, so decoding restores the text exactly.
BYTE_LEVEL_WORD_PATTERN = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
_WORD_CACHE_LIMIT = 1 << 20  # words; the cache is emptied when it grows past this


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, so BPE can work on text.

    Printable Latin-1 bytes stand for themselves; the rest (control bytes, space,
    ...) are moved to the code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    moved = (byte for byte in range(256) if byte not in table)
    table.update({byte: chr(256 + shift) for shift, byte in enumerate(moved)})
    return table


_BYTE_TO_CHAR = bytes_to_unicode()


def clean_text(text: str) -> str:
    """CLIP's cleanup: repair mojibake (ftfy), unescape HTML twice, fold whitespace, lower-case.

    ftfy.fix_text is what OpenAI's CLIP and OpenCLIP apply, so "cafÃ©" becomes "café"
    before BPE and both spellings get the same ids. Printable ASCII without '&' is a
    fixed point of ftfy and html.unescape, and it is most captions: it skips the slow part.
    """
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class Tokenizer:
    """Byte-level BPE over cleaned text; turns captions into fixed-length id rows.

    Subclasses choose the vocabulary and how text splits into words.
    """

    word_pattern: regex.Pattern
    context_length: int = DEFAULT_CONTEXT_LENGTH
    pad_token_id: int = PAD_TOKEN_ID
    # Words whose ids are fixed in advance rather than found by BPE.
    reserved_words: dict[str, tuple[int, ...]] = {}

    def __init__(self, backend: RustTokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH):
        self.backend = backend
        self.context_length = context_length
        self.sot_token_id = self._special_id(SOT_TOKEN)
        self.eot_token_id = self._special_id(EOT_TOKEN)
        self._forget_words()

    def _forget_words(self) -> None:
        self._word_ids: dict[str, tuple[int, ...]] = dict(self.reserved_words)

    def _special_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _words(self, cleaned: str) -> list[str]:
        return self.word_pattern.findall(cleaned)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        symbols = "".join(_BYTE_TO_CHAR[byte] for byte in word.encode("utf-8"))
        return tuple(token.id for token in self.backend.model.tokenize(symbols))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens."""
        if len(self._word_ids) > _WORD_CACHE_LIMIT:
            self._forget_words()
        cache = self._word_ids
        ids: list[int] = []
        for word in self._words(clean_text(text)):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = cache[word] = self._bpe_word(word)
            ids.extend(word_ids)
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a row of ids; stops at the first end token (what follows is padding)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        ids = [i for i in ids if i != self.sot_token_id]
        return self.backend.decode(ids, skip_special_tokens=True).strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """[N, context_length] int64: [sot] + ids + [eot], then pad id 0.

        Too long a text is cut so that its last position is still the end token,
        as CLIP does: the text model reads its features there.
        """
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start + end), got {context_length}")
        rows = np.full((len(texts), context_length), self.pad_token_id, dtype=np.int64)
        for row, text in zip(rows, texts):
            tokens = [self.sot_token_id, *self.encode(text)[: context_length - 2], self.eot_token_id]
            row[: len(tokens)] = tokens
        return torch.from_numpy(rows)

    def save(self, path: str | Path) -> Path:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        # Ray ships tokenizers to workers by pickling: leave the word cache behind.
        return {**self.__dict__, "_word_ids": dict(self.reserved_words)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length})"


class ClipTokenizer(Tokenizer):
    """OpenAI CLIP's tokenizer, built from its merges file; ids equal open_clip.tokenize's."""

    word_pattern = CLIP_WORD_PATTERN

    def __init__(self, merges_path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH):
        lines = _read_merges_text(Path(merges_path)).split("\n")
        # The file lists merges best first after a version line; CLIP keeps as many
        # as fill its vocabulary.
        self._merges_lines = lines[: 1 + CLIP_VOCAB_SIZE - 512 - 2]
        merges = [tuple(line.split()) for line in self._merges_lines[1:]]
        alphabet = list(_BYTE_TO_CHAR.values())
        vocab = [*alphabet, *(char + END_OF_WORD for char in alphabet), *("".join(m) for m in merges)]
        backend = RustTokenizer(
            models.BPE(vocab={token: i for i, token in enumerate(vocab)}, merges=merges, end_of_word_suffix=END_OF_WORD)
        )
        backend.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
        # The same pipeline in Rust, so backend.encode/decode agree with ours.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(RustRegex("(?i)" + CLIP_WORD_PATTERN.pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        # "</w>" ends a word: turn it into the byte-level space before bytes become text.
        backend.decoder = decoders.Sequence([decoders.Replace(END_OF_WORD, _BYTE_TO_CHAR[ord(" ")]), decoders.ByteLevel()])
        super().__init__(backend, context_length)
        if self.vocab_size != CLIP_VOCAB_SIZE:
            raise ValueError(f"{merges_path} gives {self.vocab_size} tokens, CLIP has {CLIP_VOCAB_SIZE}: not a CLIP merges file?")
        # Special tokens written in the text map to themselves, as in OpenAI's code.
        self.reserved_words = {SOT_TOKEN: (self.sot_token_id,), EOT_TOKEN: (self.eot_token_id,)}
        self._forget_words()

    def save(self, path: str | Path) -> Path:
        """Writes the (gzipped) merges this tokenizer uses; a folder gets the usual file name."""
        path = Path(path)
        if path.is_dir():
            path = path / CLIP_MERGES_FILENAME
        with gzip.GzipFile(path, "wb", mtime=0) as file:
            file.write("\n".join(self._merges_lines).encode("utf-8"))
        return path


class TrainedBpeTokenizer(Tokenizer):
    """A byte-level BPE learned from your captions; one tokenizer.json holds it all."""

    word_pattern = BYTE_LEVEL_WORD_PATTERN

    def __init__(self, backend: RustTokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH):
        super().__init__(backend, context_length)
        if self.backend.token_to_id(PAD_TOKEN) != PAD_TOKEN_ID:
            raise ValueError(f"trained tokenizer must have {PAD_TOKEN} at id {PAD_TOKEN_ID}")

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "TrainedBpeTokenizer":
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        pre_tokenizer = spec.get("pre_tokenizer") or {}
        if spec.get("model", {}).get("type") != "BPE" or pre_tokenizer.get("type") != "ByteLevel" \
                or not pre_tokenizer.get("add_prefix_space") or not pre_tokenizer.get("use_regex", True):
            raise ValueError(f"{path} is not a byte-level BPE tokenizer.json made by train_bpe_tokenizer")
        return cls(RustTokenizer.from_file(str(path)), context_length)

    def _words(self, cleaned: str) -> list[str]:
        # Every word, the first included, starts with its space: "dog" is one token anywhere.
        return self.word_pattern.findall(" " + cleaned) if cleaned else []

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / TRAINED_FILENAME
        self.backend.save(str(path))
        return path


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> TrainedBpeTokenizer:
    """Learns a byte-level BPE of `vocab_size` tokens (pad 0, sot 1, eot 2, then bytes and merges).

    All 256 bytes are in the vocabulary whatever the captions hold, so any text
    encodes without unknown tokens. A small corpus may stop short of `vocab_size`.
    """
    specials = [PAD_TOKEN, SOT_TOKEN, EOT_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(specials) + len(alphabet)} (specials + bytes), got {vocab_size}")
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator((clean_text(text) for text in texts), trainer=trainer)
    return TrainedBpeTokenizer(backend, context_length)


def load_tokenizer(path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """Opens a saved tokenizer: a trained tokenizer.json, or CLIP's merges (.txt.gz or .txt).

    The kind is told from the content; a folder is searched for the usual file names.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / TRAINED_FILENAME, path / CLIP_MERGES_FILENAME, *sorted(path.glob("*.txt.gz"))]
        found = [candidate for candidate in candidates if candidate.is_file()]
        if not found:
            raise FileNotFoundError(f"no {TRAINED_FILENAME} or CLIP merges .txt.gz in {path}")
        path = found[0]
    with open(path, "rb") as file:
        head = file.read(256)
    # A merges file is gzipped, or its first line carries a "#version" tag.
    if head.startswith(b"\x1f\x8b") or b"#version" in head.split(b"\n")[0]:
        return ClipTokenizer(path, context_length)
    if head.lstrip().startswith(b"{"):
        return TrainedBpeTokenizer.from_file(path, context_length)
    raise ValueError(f"{path} is neither a tokenizer.json nor a CLIP merges file")



def _read_merges_text(path: Path) -> str:
    with open(path, "rb") as file:
        data = file.read()
    if data.startswith(b"\x1f\x8b"):
        data = gzip.decompress(data)
    return data.decode("utf-8")
