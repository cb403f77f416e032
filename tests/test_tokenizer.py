"""Tokenizers: CLIP's ids must equal open_clip's exactly; the trained BPE must round-trip."""

from __future__ import annotations

import csv
import gzip
import pickle
import random
from pathlib import Path

import ftfy
import pytest
import torch

from clip_ray.model.tokenizer import (
    CLIP_WORD_PATTERN, ClipTokenizer, TrainedBpeTokenizer, clean_text, load_tokenizer, train_bpe_tokenizer,
)

ODD_TEXTS = [
    "",
    "   ",
    "\t\n ",
    "&amp;lt;",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#x27;hex&#x27;",
    "café déjà vu",
    "Ünïcödé ÀÉÎÕÜ straße",
    "一只狗在草地上奔跑",
    "犬が芝生の上を走っている",
    "🐶 dog 🐕‍🦺 with 👍🏽 and 🇫🇷",
    "The year 2024 had 365 days, 3.14159 and 1,000,000 !",
    "!!!",
    "!",
    "wow!¿ !~ !§",
    "...???!!! ---- ((())) $$$ ###",
    "MiXeD CaSe TeXt With CAPS",
    "don't it's we're I'LL they've she'd I'M",
    "multiple     spaces\tand\nnewlines\r\nhere",
    "non\u00a0breaking\u2003em space\u200bzero width",
    "<start_of_text> a dog <end_of_text>",
    "Ã©tÃ© mojibake",
    " ".join(["a very long caption about a dog"] * 20),
    "x" * 500,
]


@pytest.fixture(scope="session")
def open_clip_module():
    return pytest.importorskip("open_clip", reason="open_clip (open-clip-torch, the `bench` extra) is the reference and ships the CLIP merges file")


@pytest.fixture(scope="session")
def clip_merges_path(open_clip_module) -> Path:
    path = Path(open_clip_module.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        pytest.skip(f"the installed open_clip has no merges file at {path}")
    return path


@pytest.fixture(scope="session")
def clip_tokenizer(clip_merges_path) -> ClipTokenizer:
    return load_tokenizer(clip_merges_path)


@pytest.fixture(scope="session")
def flickr_captions(flickr8k_dir) -> list[tuple[str, str]]:
    """(image name, caption) rows, in file order."""
    with open(flickr8k_dir / "captions.csv", newline="", encoding="utf-8") as file:
        return [(row["image"], row["caption"]) for row in csv.DictReader(file)]


@pytest.fixture(scope="session")
def split_captions(flickr8k_dir, flickr_captions) -> dict[str, list[str]]:
    splits = {}
    for split in ("train", "test"):
        names = set((flickr8k_dir / "splits" / f"{split}.txt").read_text().split())
        splits[split] = [caption for image, caption in flickr_captions if image in names]
    return splits


@pytest.fixture(scope="session")
def trained_tokenizer(split_captions) -> TrainedBpeTokenizer:
    return train_bpe_tokenizer(split_captions["train"], vocab_size=4096)


def random_unicode_texts(count: int, seed: int = 0) -> list[str]:
    """Deterministic junk mixing ASCII, accents, combining marks, CJK, emoji, odd spaces."""
    rng = random.Random(seed)
    blocks = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x300, 0x370), range(0x2000, 0x2070),
              range(0x3000, 0x3100), range(0x4E00, 0x4F00), range(0x1F300, 0x1F700), range(0xFE00, 0xFF00)]
    fragments = [" ", "&amp;", "&lt;", "'s", "'LL", "Dog", "\n"]
    texts = []
    for _ in range(count):
        chosen = [block for block in blocks if rng.random() < 0.4] or blocks[:1]
        texts.append("".join(
            chr(rng.choice(rng.choice(chosen))) if rng.random() < 0.8 else rng.choice(fragments)
            for _ in range(rng.randint(0, 30))
        ))
    return texts


# --- CLIP scheme --------------------------------------------------------------------

@pytest.mark.shared_data
def test_clip_ids_equal_open_clip_on_all_flickr8k_captions(clip_tokenizer, open_clip_module, flickr_captions):
    captions = [caption for _, caption in flickr_captions]
    assert len(captions) == 40455
    ours = clip_tokenizer(captions)
    reference = open_clip_module.tokenize(captions)
    assert ours.dtype == torch.long and ours.shape == (40455, 77)
    mismatched = (ours != reference).any(dim=1).nonzero().flatten().tolist()
    assert not mismatched, f"{len(mismatched)} captions differ, first: {captions[mismatched[0]]!r}"


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_clip_ids_equal_open_clip_on_odd_text(clip_tokenizer, open_clip_module, text):
    assert torch.equal(clip_tokenizer(text), open_clip_module.tokenize(text))
    assert torch.equal(clip_tokenizer(text, context_length=16), open_clip_module.tokenize(text, context_length=16))


def test_clip_ids_equal_open_clip_on_random_unicode(clip_tokenizer, open_clip_module):
    texts = random_unicode_texts(2000)
    assert torch.equal(clip_tokenizer(texts), open_clip_module.tokenize(texts))


def test_clip_vocabulary_and_special_ids(clip_tokenizer):
    assert clip_tokenizer.vocab_size == 49408
    assert (clip_tokenizer.sot_token_id, clip_tokenizer.eot_token_id, clip_tokenizer.pad_token_id) == (49406, 49407, 0)
    assert clip_tokenizer.context_length == 77
    assert clip_tokenizer.decode([clip_tokenizer.sot_token_id, 320, 1929, clip_tokenizer.eot_token_id]) == "a dog"


def test_clip_token_zero_is_exclamation_not_padding(clip_tokenizer):
    # Id 0 is "!" inside a word; it may appear before the end token but never after it.
    ids = clip_tokenizer.encode("wow!¿")
    assert 0 in ids
    row = clip_tokenizer("wow!¿")[0]
    eot_position = len(ids) + 1
    assert row[eot_position] == clip_tokenizer.eot_token_id
    assert row.nonzero().max().item() == eot_position
    assert clip_tokenizer.decode(row) == clip_tokenizer.decode(ids) == "wow !¿"


def test_empty_text_is_start_end_then_padding(clip_tokenizer):
    for text in ("", "   \n"):
        row = clip_tokenizer(text)[0]
        assert row[:2].tolist() == [49406, 49407]
        assert not row[2:].any()
        assert clip_tokenizer.decode(row) == ""


def test_truncation_keeps_end_token(clip_tokenizer):
    text = " ".join(f"word{i}" for i in range(100))
    ids = clip_tokenizer.encode(text)
    assert len(ids) > 77
    for context_length in (77, 10, 2):
        row = clip_tokenizer(text, context_length=context_length)[0]
        assert row.shape == (context_length,)
        assert row[0] == clip_tokenizer.sot_token_id and row[-1] == clip_tokenizer.eot_token_id
        assert row[1:-1].tolist() == ids[: context_length - 2]
    with pytest.raises(ValueError):
        clip_tokenizer(text, context_length=1)


@pytest.mark.shared_data
def test_clip_decode_round_trips_captions(clip_tokenizer, flickr_captions):
    # CLIP's decoding puts one space between words as its regex splits them.
    sample = [caption for _, caption in flickr_captions[::20]]
    for caption in sample:
        words = CLIP_WORD_PATTERN.findall(clean_text(caption))
        assert clip_tokenizer.decode(clip_tokenizer.encode(caption)) == " ".join(words)
    assert clip_tokenizer.decode(clip_tokenizer.encode("A  Dog runs on the GRASS .")) == "a dog runs on the grass ."


def test_clip_save_and_load_by_content(clip_tokenizer, tmp_path):
    texts = ODD_TEXTS + ["a black dog and a spotted dog are fighting"]
    saved = clip_tokenizer.save(tmp_path)
    assert saved == tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    for path in (saved, tmp_path):
        reloaded = load_tokenizer(path)
        assert isinstance(reloaded, ClipTokenizer)
        assert torch.equal(reloaded(texts), clip_tokenizer(texts))
    # An uncompressed merges file with an unhelpful name is still recognised.
    plain = tmp_path / "merges.bin"
    plain.write_bytes(gzip.decompress(saved.read_bytes()))
    assert torch.equal(load_tokenizer(plain)(texts), clip_tokenizer(texts))


def test_clip_tokenizer_survives_pickling(clip_tokenizer):
    clip_tokenizer.encode("warm the word cache")
    copy = pickle.loads(pickle.dumps(clip_tokenizer))
    assert torch.equal(copy(ODD_TEXTS), clip_tokenizer(ODD_TEXTS))


# --- cleanup ------------------------------------------------------------------------

def test_clean_text():
    assert clean_text("  A  Dog\tRuns\n") == "a dog runs"
    assert clean_text("&amp;lt;b&amp;gt;") == "<b>"  # unescaped twice, as CLIP does
    assert clean_text("Café") == "café"


def test_clean_text_ascii_shortcut_agrees_with_ftfy():
    import html

    rng = random.Random(1)
    for _ in range(3000):
        text = "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randint(0, 40)))
        slow = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert clean_text(text) == slow, text


MOJIBAKE_AND_REPAIRED = [
    ("a dog at the cafÃ© door", "a dog at the café door"),  # UTF-8 read as Latin-1/cp1252
    ("the dog doesnâ€™t swim", "the dog doesn't swim"),
    ("naÃ¯ve crÃ¨me brÃ»lÃ©e on a plate", "naïve crème brûlée on a plate"),
]


@pytest.mark.parametrize(("mojibake", "repaired"), MOJIBAKE_AND_REPAIRED)
def test_clip_tokenizes_mojibake_like_the_repaired_caption(clip_tokenizer, open_clip_module, mojibake, repaired):
    # ftfy is required: without it the mis-encoded caption would keep its "Ã©" and get other ids.
    assert clean_text(mojibake) == clean_text(repaired)
    assert torch.equal(clip_tokenizer(mojibake), clip_tokenizer(repaired))
    assert torch.equal(clip_tokenizer(mojibake), open_clip_module.tokenize(mojibake))


# --- trained scheme -----------------------------------------------------------------

@pytest.mark.shared_data
def test_trained_vocabulary_and_special_ids(trained_tokenizer):
    assert trained_tokenizer.vocab_size == 4096
    assert trained_tokenizer.pad_token_id == 0
    assert trained_tokenizer.backend.id_to_token(0) == "<pad>"
    assert len({0, trained_tokenizer.sot_token_id, trained_tokenizer.eot_token_id}) == 3
    row = trained_tokenizer("")[0]
    assert row[:2].tolist() == [trained_tokenizer.sot_token_id, trained_tokenizer.eot_token_id]
    assert not row[2:].any()


@pytest.mark.shared_data
def test_trained_round_trips_captions_exactly(trained_tokenizer, split_captions):
    for caption in split_captions["test"]:
        assert trained_tokenizer.decode(trained_tokenizer(caption)[0]) == clean_text(caption)


@pytest.mark.shared_data
def test_trained_encodes_unseen_unicode_without_unknowns(trained_tokenizer):
    specials = {trained_tokenizer.pad_token_id, trained_tokenizer.sot_token_id, trained_tokenizer.eot_token_id}
    for text in ODD_TEXTS + random_unicode_texts(300, seed=2):
        if "_of_text>" in text:
            continue  # the special tokens' own spelling, covered below
        ids = trained_tokenizer.encode(text)
        assert all(0 <= i < trained_tokenizer.vocab_size and i not in specials for i in ids), text
        assert trained_tokenizer.decode(ids) == clean_text(text)
    # Text that spells a special token stays text: captions cannot inject control tokens.
    ids = trained_tokenizer.encode("<end_of_text>")
    assert trained_tokenizer.eot_token_id not in ids and trained_tokenizer.decode(ids) == "<end_of_text>"


@pytest.mark.shared_data
def test_trained_ids_agree_with_the_tokenizer_json_pipeline(trained_tokenizer, split_captions):
    # Anyone opening tokenizer.json with the `tokenizers` library gets the same ids.
    texts = split_captions["test"][:2000] + [t for t in ODD_TEXTS + random_unicode_texts(500, seed=3) if "_of_text>" not in t]
    rust = trained_tokenizer.backend.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
    assert [encoding.ids for encoding in rust] == trained_tokenizer.encode_batch(texts)


@pytest.mark.shared_data
def test_trained_save_and_load(trained_tokenizer, split_captions, tmp_path):
    saved = trained_tokenizer.save(tmp_path / "tok.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]
    texts = split_captions["test"][:1000] + ODD_TEXTS
    reloaded = load_tokenizer(saved)
    assert isinstance(reloaded, TrainedBpeTokenizer)
    assert (reloaded.vocab_size, reloaded.sot_token_id, reloaded.eot_token_id) == (
        trained_tokenizer.vocab_size, trained_tokenizer.sot_token_id, trained_tokenizer.eot_token_id)
    assert torch.equal(reloaded(texts), trained_tokenizer(texts))
    folder = tmp_path / "folder"
    folder.mkdir()
    assert trained_tokenizer.save(folder) == folder / "tokenizer.json"
    assert torch.equal(load_tokenizer(folder)(texts), trained_tokenizer(texts))
    assert torch.equal(pickle.loads(pickle.dumps(trained_tokenizer))(texts), trained_tokenizer(texts))


def test_small_training_corpus_and_bad_vocab_size():
    captions = ["a dog runs on the grass", "a cat sleeps on the sofa", "two dogs play in the snow"] * 5
    tokenizer = train_bpe_tokenizer(captions, vocab_size=300)
    assert 259 < tokenizer.vocab_size <= 300
    assert tokenizer.decode(tokenizer.encode("A dog plays ½ 🐕")) == "a dog plays ½ 🐕"
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(captions, vocab_size=200)


def test_load_rejects_other_files(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("just some notes\n")
    with pytest.raises(ValueError):
        load_tokenizer(junk)
    foreign = tmp_path / "other.json"
    foreign.write_text('{"model": {"type": "WordLevel"}}')
    with pytest.raises(ValueError, match="byte-level BPE"):
        load_tokenizer(foreign)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
