"""A clip-ray tokenizer as files Hugging Face transformers (and OpenCLIP's HFTokenizer) load.

clip-ray tokenizes in two steps: Python cleans the text (ftfy, HTML unescape, whitespace folding,
lower-case) and adds [sot] ... [eot] and the padding; the `tokenizers` BPE in between only merges.
A transformers tokenizer does all of it from its files, so the export spells the steps out there:

- CLIP's BPE (OpenAI's merges file): vocab.json + merges.txt in the layout of OpenAI's CLIP on the
  Hub, loaded by `CLIPTokenizer`, which lower-cases, folds whitespace and adds <|startoftext|> and
  <|endoftext|> (clip-ray's <start_of_text>/<end_of_text>: the same ids). It pads with <|endoftext|>, as
  the Hub's CLIP does, where clip-ray pads with id 0: a pad token "!" (id 0) would turn every "!" of a
  caption into padding. The features do not change: the text tower reads them at the first end token,
  and its causal mask keeps what follows from reaching it.
- A trained `bpe:N` tokenizer: its tokenizer.json with a normalizer (fold whitespace, lower-case)
  and a post-processor adding <start_of_text> / <end_of_text>, loaded by `PreTrainedTokenizerFast`.

Called with padding="max_length", max_length=context_length and truncation=True, either gives the
ids clip-ray gives (CLIP's BPE: up to the padding), except where ftfy would repair mis-encoded text
("cafÃ©": transformers has no ftfy) and where a caption spells out a special token.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, normalizers, processors
from tokenizers import Tokenizer as RustTokenizer

from clip_ray.model.tokenizer import (
    EOT_TOKEN, PAD_TOKEN, SOT_TOKEN, TRAINED_FILENAME, ClipTokenizer, Tokenizer, TrainedBpeTokenizer,
)

# The names OpenAI's CLIP tokenizer on the Hugging Face Hub gives the start and end tokens.
HF_CLIP_SOT, HF_CLIP_EOT = "<|startoftext|>", "<|endoftext|>"

USAGE = "tokenizer(texts, padding='max_length', max_length={context_length}, truncation=True)"
DIFFERENCES = ("transformers' tokenizer does not repair mis-encoded text with ftfy as clip-ray does (a caption such "
               "as 'cafÃ©' gets other ids), and it reads a special token's name written in a caption as that token")
CLIP_BPE_PADDING = ("CLIP's BPE pads with <|endoftext|> (49407) where clip-ray pads with 0, as the Hub's CLIP "
                    "tokenizer does; the features are the same (read at the first end token)")


def _write_json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _clip_bpe_files(tokenizer: ClipTokenizer, folder: Path) -> list[Path]:
    vocab = tokenizer.backend.get_vocab(with_added_tokens=False)
    vocab.update({HF_CLIP_SOT: tokenizer.sot_token_id, HF_CLIP_EOT: tokenizer.eot_token_id})
    merges = ["#version: 0.2", *tokenizer._merges_lines[1:]]
    specials = {"bos_token": HF_CLIP_SOT, "eos_token": HF_CLIP_EOT, "unk_token": HF_CLIP_EOT, "pad_token": HF_CLIP_EOT}
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    return [
        _write_json(folder / "vocab.json", dict(sorted(vocab.items(), key=lambda item: item[1]))),
        folder / "merges.txt",
        _write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer", **specials, "model_max_length": tokenizer.context_length,
            "do_lower_case": True, "errors": "replace", "clean_up_tokenization_spaces": False}),
        _write_json(folder / "special_tokens_map.json", specials),
    ]


def trained_bpe_for_transformers(tokenizer: TrainedBpeTokenizer) -> RustTokenizer:
    """A copy of the trained tokenizer that also cleans the text and adds the start and end tokens."""
    backend = RustTokenizer.from_str(tokenizer.backend.to_str())
    backend.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SOT_TOKEN} $A {EOT_TOKEN}", pair=f"{SOT_TOKEN} $A {EOT_TOKEN} $B {EOT_TOKEN}",
        special_tokens=[(SOT_TOKEN, tokenizer.sot_token_id), (EOT_TOKEN, tokenizer.eot_token_id)])
    return backend


def _trained_bpe_files(tokenizer: TrainedBpeTokenizer, folder: Path) -> list[Path]:
    trained_bpe_for_transformers(tokenizer).save(str(folder / TRAINED_FILENAME))
    specials = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "pad_token": PAD_TOKEN}
    return [
        folder / TRAINED_FILENAME,
        _write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", **specials,
            "model_max_length": tokenizer.context_length, "padding_side": "right",
            "clean_up_tokenization_spaces": False}),
        _write_json(folder / "special_tokens_map.json", specials),
    ]


def write_transformers_tokenizer(tokenizer: Tokenizer, folder: str | Path) -> list[Path]:
    """Writes the files `transformers.AutoTokenizer.from_pretrained(folder)` loads; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, ClipTokenizer):
        return _clip_bpe_files(tokenizer, folder)
    if isinstance(tokenizer, TrainedBpeTokenizer):
        return _trained_bpe_files(tokenizer, folder)
    raise TypeError(f"no transformers form for a {type(tokenizer).__name__}")
