"""Weights and configs in other projects' layouts: Hugging Face transformers' CLIPModel (`hf`), OpenCLIP's
model-config JSON (`openclip`) and OpenAI's TorchScript archives (`torchscript`).

Every converter works on plain dicts and tensors and speaks clip-ray's side in OpenAI's layout (the
state dict of clip_ray.model.clip.CLIP), so nothing here imports transformers or open_clip. What a
converter cannot map exactly is an error naming the key or tensor, never a silent approximation.
"""

from __future__ import annotations

from typing import Mapping

import torch

from clip_ray.config import TextConfig

# The end-of-text id of clip-ray's tokenizers: CLIP's BPE puts it last (49407 of 49408); a trained `bpe:N`
# tokenizer numbers its specials pad 0, sot 1, eot 2 (clip_ray/model/tokenizer.py: train_bpe_tokenizer).
CLIP_BPE_EOT_ID = 49407
CLIP_BPE_SOT_ID = 49406
TRAINED_BPE_SOT_ID = 1
TRAINED_BPE_EOT_ID = 2


class UnsupportedExport(ValueError):
    """The model has something the target format cannot express (the message says what)."""


def default_special_ids(text: TextConfig) -> tuple[int, int]:
    """(sot, eot) of the clip-ray tokenizer a text tower of this vocabulary is trained with: CLIP's BPE for
    its 49408 tokens, otherwise a trained `bpe:N` tokenizer."""
    from clip_ray.model.tokenizer import CLIP_VOCAB_SIZE

    if text.vocab_size == CLIP_VOCAB_SIZE:
        return CLIP_BPE_SOT_ID, CLIP_BPE_EOT_ID
    return TRAINED_BPE_SOT_ID, TRAINED_BPE_EOT_ID


def expected_shapes(config) -> dict[str, torch.Size]:
    """Name -> shape of every tensor in the state dict of a clip-ray model built from `config` (no memory)."""
    from clip_ray.model.clip import build_model

    return {name: tensor.shape for name, tensor in build_model(config, device="meta").state_dict().items()}


def check_state_dict(state: Mapping[str, torch.Tensor], config, source: str,
                     origin: Mapping[str, str] | None = None) -> None:
    """Raises a ValueError naming every missing, unexpected or wrongly shaped tensor of `state` against the
    model `config` describes (`source` says where the weights came from; `origin` maps a clip-ray name to
    the source's own name of that tensor, for the message)."""
    origin = origin or {}
    shapes = expected_shapes(config)
    missing = [name for name in shapes if name not in state]
    unexpected = [name for name in state if name not in shapes]
    wrong = [f"{name}{f' (from {origin[name]})' if name in origin else ''}: {tuple(state[name].shape)} in {source}, "
             f"{tuple(shape)} in the model"
             for name, shape in shapes.items() if name in state and state[name].shape != shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong)}")
    if problems:
        raise ValueError(f"{source} does not fit model {config.name!r}: " + "; ".join(problems))


__all__ = ["UnsupportedExport", "check_state_dict", "default_special_ids", "expected_shapes"]
