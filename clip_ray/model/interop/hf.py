"""Hugging Face transformers' CLIPModel <-> clip-ray (OpenAI layout), on plain dicts and tensors.

The two layouts hold the same numbers in different places: HF keeps queries, keys and values as three
Linear layers where OpenAI packs them into one `in_proj_weight`, stores the projections as Linear weights
(transposed), and names things its own way (`pre_layrnorm` -> `ln_pre`, `fc1` -> `c_fc`, ...).

Text pooling is where the two can disagree. clip-ray reads the text features at the last token that is
not the pad id. HF's CLIPTextTransformer (transformers 5.x, modeling_clip.py) pools at
`input_ids.argmax(-1)` when its config says eos_token_id == 2 (the legacy configs of OpenAI's models), and
otherwise at the *first* occurrence of eos_token_id. So:
- CLIP's BPE (sot 49406, eot 49407, pad 0): exported with eos_token_id 49407, HF pools at the first eot,
  which is where clip-ray pools for every row clip-ray's tokenizer writes. They differ only for a text that
  spells "<end_of_text>" itself (the tokenizer maps it to the eot id, so the row holds two) or for rows
  made by another tokenizer that pads with the eot id and has no eot before it.
- A trained `bpe:N` tokenizer has eot 2, the one value HF treats as the legacy argmax flag. Such a model is
  exported after `relocate_eot_for_hf` moves the eot to another id in both the embedding and the tokenizer.
- Reading a legacy config (eos_token_id 2), HF pools at the largest id, which is CLIP's eot (49407): clip-ray
  pools at the same place for rows of CLIP's tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch

from clip_ray.config import ModelConfig, TextConfig, VisionConfig
from clip_ray.model.interop import UnsupportedExport, check_state_dict

# What transformers' CLIPTextConfig / CLIPVisionConfig assume for a key a config.json leaves out.
HF_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407}
HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
HF_PROJECTION_DIM = 512
HF_LEGACY_EOS_ID = 2  # HF pools at argmax(input_ids) for this eos id, not at the eos token
SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")  # HF's "gelu" is the exact erf GELU, as torch's nn.GELU
LAYER_NORM_EPS = 1e-5  # clip-ray's LayerNorms (torch's default)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# HF name inside a Transformer layer -> clip-ray name inside a residual block (q/k/v are packed separately).
_BLOCK_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_IGNORABLE_SUFFIXES = ("position_ids",)  # buffers older transformers saved; recomputed from the config


def _sub_config(hf_config: Mapping, key: str, defaults: dict) -> dict:
    given = hf_config.get(key) or hf_config.get(f"{key}_dict") or {}
    return {**defaults, **given}


def _mlp_ratio(width: int, hidden: int, key: str) -> float:
    """A ratio r with int(width * r) == hidden, as clip-ray (and OpenCLIP) size the MLP."""
    ratio = hidden / width
    for candidate in (ratio, math.nextafter(ratio, math.inf)):
        if int(width * candidate) == hidden:
            return candidate
    raise ValueError(f"{key}={hidden}: no MLP ratio of width {width} gives it")


def _heads_to_head_width(width: int, heads: int, key: str) -> int:
    if heads <= 0 or width % heads:
        raise ValueError(f"{key}={heads} does not divide hidden_size {width}")
    return width // heads


def _check_tower(tower: dict, key: str) -> None:
    act = tower["hidden_act"]
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"{key}.hidden_act={act!r} is not supported: clip-ray has {', '.join(SUPPORTED_ACTIVATIONS)}")
    if not math.isclose(tower["layer_norm_eps"], LAYER_NORM_EPS, rel_tol=1e-9):
        raise ValueError(f"{key}.layer_norm_eps={tower['layer_norm_eps']} is not supported: clip-ray's LayerNorms "
                         f"use {LAYER_NORM_EPS}")


def model_config_from_hf(hf_config: dict, name: str = "hf") -> ModelConfig:
    """The ModelConfig of a CLIPModel `config.json` (as a dict). The pad id is clip-ray's (0): features are
    read at the last token that is not 0, the end token for rows clip-ray's tokenizers write."""
    model_type = hf_config.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(f"model_type={model_type!r}: only CLIPModel ('clip') configs convert")
    text = _sub_config(hf_config, "text_config", HF_TEXT_DEFAULTS)
    vision = _sub_config(hf_config, "vision_config", HF_VISION_DEFAULTS)
    _check_tower(text, "text_config")
    _check_tower(vision, "vision_config")
    if text["hidden_act"] != vision["hidden_act"]:
        raise ValueError(f"text_config.hidden_act={text['hidden_act']!r} and vision_config.hidden_act="
                         f"{vision['hidden_act']!r} differ: clip-ray uses one activation for both towers")
    if vision["num_channels"] != 3:
        raise ValueError(f"vision_config.num_channels={vision['num_channels']}: clip-ray reads RGB images (3)")
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
        raise ValueError(f"vision_config.image_size={image_size}, patch_size={patch_size}: only square ints convert")
    return ModelConfig(
        name=name,
        embed_dim=int(hf_config.get("projection_dim", HF_PROJECTION_DIM)),
        vision=VisionConfig(
            arch="vit", image_size=image_size, patch_size=patch_size, width=vision["hidden_size"],
            layers=vision["num_hidden_layers"],
            head_width=_heads_to_head_width(vision["hidden_size"], vision["num_attention_heads"],
                                            "vision_config.num_attention_heads"),
            mlp_ratio=_mlp_ratio(vision["hidden_size"], vision["intermediate_size"],
                                 "vision_config.intermediate_size")),
        text=TextConfig(
            context_length=text["max_position_embeddings"], vocab_size=text["vocab_size"], width=text["hidden_size"],
            layers=text["num_hidden_layers"],
            head_width=_heads_to_head_width(text["hidden_size"], text["num_attention_heads"],
                                            "text_config.num_attention_heads"),
            mlp_ratio=_mlp_ratio(text["hidden_size"], text["intermediate_size"], "text_config.intermediate_size"),
            pad_token_id=0),
        activation=text["hidden_act"],
        init_logit_scale=float(hf_config.get("logit_scale_init_value", math.log(1 / 0.07))),
    )


def _tower_key_map(config: ModelConfig) -> dict[str, str]:
    """clip-ray name -> HF name, for every tensor but the packed q/k/v and the two projections."""
    names = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    norms = (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
             ("ln_final", "text_model.final_layer_norm"))
    for ours, theirs in norms:
        for param in ("weight", "bias"):
            names[f"{ours}.{param}"] = f"{theirs}.{param}"
    for ours, theirs, layers in _towers(config):
        for i in range(layers):
            for hf_name, block_name in _BLOCK_NAMES.items():
                for param in ("weight", "bias"):
                    names[f"{ours}.{i}.{block_name}.{param}"] = f"{theirs}.{i}.{hf_name}.{param}"
    return names


def _towers(config: ModelConfig) -> tuple[tuple[str, str, int], ...]:
    """(clip-ray block prefix, HF layer prefix, layers) of each tower."""
    return (("visual.transformer.resblocks", "vision_model.encoder.layers", config.vision.layers),
            ("transformer.resblocks", "text_model.encoder.layers", config.text.layers))


_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def state_dict_from_hf(hf_state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """OpenAI-layout weights of a CLIPModel state dict; `config` is the model they describe
    (model_config_from_hf). Every HF tensor must be used (or be a known buffer), every clip-ray tensor
    filled, every shape right: otherwise a ValueError naming the tensors."""
    used: set[str] = set()
    missing: list[str] = []

    def take(name: str) -> torch.Tensor | None:
        if name not in hf_state:
            missing.append(name)
            return None
        used.add(name)
        return hf_state[name]

    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for ours, theirs in _tower_key_map(config).items():
        tensor = take(theirs)
        if tensor is not None:
            out[ours], origin[ours] = tensor, theirs
    for ours, theirs in _PROJECTIONS.items():
        tensor = take(theirs)
        if tensor is not None:
            out[ours], origin[ours] = tensor.t().contiguous(), f"{theirs} (transposed)"
    for ours, theirs, layers in _towers(config):
        for i in range(layers):
            for param in ("weight", "bias"):
                parts = [take(f"{theirs}.{i}.self_attn.{p}_proj.{param}") for p in ("q", "k", "v")]
                if all(part is not None for part in parts):
                    if len({part.shape for part in parts}) != 1:
                        raise ValueError(f"{theirs}.{i}.self_attn.{{q,k,v}}_proj.{param} differ in shape: "
                                         f"{[tuple(part.shape) for part in parts]}")
                    name = f"{ours}.{i}.attn.in_proj_{param}"
                    out[name], origin[name] = torch.cat(parts, dim=0), f"{theirs}.{i}.self_attn.{{q,k,v}}_proj.{param}"
    unused = [name for name in hf_state if name not in used and not name.endswith(_IGNORABLE_SUFFIXES)]
    if missing or unused:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"not used (not a CLIPModel of this shape?) {', '.join(unused)}"] if unused else [])
        raise ValueError(f"Hugging Face weights do not fit model {config.name!r}: " + "; ".join(parts))
    check_state_dict(out, config, "the Hugging Face weights", origin)
    return out


def _check_exportable(config: ModelConfig, state: Mapping[str, torch.Tensor] | None = None) -> None:
    if config.vision.arch != "vit":
        raise UnsupportedExport(
            f"model {config.name!r} has a ModifiedResNet image tower ({config.vision.arch}): transformers' CLIPModel "
            "has only a ViT image tower; export it to OpenCLIP, ONNX or safetensors instead")
    if config.init_logit_bias is not None or (state is not None and "logit_bias" in state):
        raise UnsupportedExport(
            f"model {config.name!r} has a learned logit bias (SigLIP loss): transformers' CLIPModel has no logit_bias, "
            "so its logits would be wrong; export it to OpenCLIP, ONNX or safetensors instead")


def state_dict_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A CLIPModel state dict of OpenAI-layout weights (each tensor its own contiguous copy, ready for
    safetensors). A ResNet image tower or a logit bias raises UnsupportedExport."""
    _check_exportable(config, state)
    check_state_dict(state, config, "the clip-ray weights")
    out = {theirs: state[ours].detach().clone().contiguous() for ours, theirs in _tower_key_map(config).items()}
    for ours, theirs in _PROJECTIONS.items():
        out[theirs] = state[ours].detach().t().contiguous()
    for ours, theirs, layers in _towers(config):
        for i in range(layers):
            for param in ("weight", "bias"):
                packed = state[f"{ours}.{i}.attn.in_proj_{param}"].detach()
                for part, tensor in zip(("q", "k", "v"), packed.chunk(3, dim=0)):
                    out[f"{theirs}.{i}.self_attn.{part}_proj.{param}"] = tensor.clone().contiguous()
    return out


def hf_config_from_model_config(config: ModelConfig, *, bos_token_id: int, eos_token_id: int,
                                pad_token_id: int) -> dict:
    """The CLIPModel config.json (as a dict) of a clip-ray model whose tokenizer has these special ids.

    eos_token_id must be where clip-ray pools (the tokenizer's end token); 2 cannot be (HF reads it as the
    legacy argmax flag): move it first with relocate_eot_for_hf.
    """
    _check_exportable(config)
    if eos_token_id == HF_LEGACY_EOS_ID:
        raise UnsupportedExport(
            f"eos_token_id={HF_LEGACY_EOS_ID}: transformers' CLIPModel then pools at argmax(input_ids) instead of the "
            "end token; move the end token to another id first (relocate_eot_for_hf)")
    text, vision = config.text, config.vision
    common = {"hidden_act": config.activation, "layer_norm_eps": LAYER_NORM_EPS, "attention_dropout": 0.0,
              "initializer_range": 0.02, "initializer_factor": 1.0, "projection_dim": config.embed_dim}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.init_logit_scale,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": text.vocab_size, "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio), "num_hidden_layers": text.layers,
            "num_attention_heads": text.width // text.head_width, "max_position_embeddings": text.context_length,
            "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, **common},
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio), "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.width // vision.head_width, "num_channels": 3,
            "image_size": vision.image_size, "patch_size": vision.patch_size, **common},
    }


def relocate_eot_for_hf(state: Mapping[str, torch.Tensor], tokenizer_json: dict,
                        eot_token_id: int = HF_LEGACY_EOS_ID) -> tuple[dict[str, torch.Tensor], dict, int]:
    """Swaps the end token (id 2 in a trained `bpe:N` tokenizer) with the tokenizer's last id, in the token
    embedding of `state` and in the `tokenizers` JSON `tokenizer_json`, so a CLIPModel pools at it.

    Returns (weights, tokenizer JSON, new end id); inputs are left as they are. Texts tokenized by the
    returned tokenizer give the same features as the original pair did.
    """
    spec = json.loads(json.dumps(tokenizer_json))
    vocab = spec.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError("tokenizer JSON has no model.vocab: not a `tokenizers` BPE tokenizer.json")
    added = spec.get("added_tokens", [])
    by_id = {token_id: token for token, token_id in vocab.items()}
    by_id.update({entry["id"]: entry["content"] for entry in added})
    last = max(by_id)
    if eot_token_id not in by_id:
        raise ValueError(f"tokenizer has no token with id {eot_token_id}")
    embedding = state["token_embedding.weight"]
    if last >= embedding.shape[0]:
        raise ValueError(f"tokenizer id {last} is outside token_embedding.weight ({embedding.shape[0]} rows)")
    swap = {eot_token_id: last, last: eot_token_id}
    for token, token_id in vocab.items():
        vocab[token] = swap.get(token_id, token_id)
    for entry in added:
        entry["id"] = swap.get(entry["id"], entry["id"])
    rows = torch.arange(embedding.shape[0])
    rows[eot_token_id], rows[last] = last, eot_token_id
    moved = {**state, "token_embedding.weight": embedding[rows].clone()}
    return moved, spec, last


def _special_ids(folder: Path, text: dict, vocab_size: int) -> dict[str, int | None]:
    """bos/eos/pad ids: the tokenizer files' where the folder has them, otherwise the config's (a legacy
    config's bos 0 / eos 2 mean CLIP's last two ids, where its argmax pooling finds the end token)."""
    ids = {key: text.get(f"{key}_token_id") for key in ("bos", "eos", "pad")}
    tokenizer_file, tokenizer_config = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not (tokenizer_file.is_file() and tokenizer_config.is_file()):
        if ids["eos"] == HF_LEGACY_EOS_ID:
            ids["bos"], ids["eos"] = vocab_size - 2, vocab_size - 1
        return ids
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    token_ids = {**spec.get("model", {}).get("vocab", {}),
                 **{entry["content"]: entry["id"] for entry in spec.get("added_tokens", [])}}
    settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    for key in ids:
        token = settings.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in token_ids:
            ids[key] = token_ids[token]
    return ids


def _read_safetensors_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / WEIGHTS_FILE).is_file():
        return load_file(folder / WEIGHTS_FILE)
    if (folder / WEIGHTS_INDEX_FILE).is_file():
        weight_map = json.loads((folder / WEIGHTS_INDEX_FILE).read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(folder / shard))
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ValueError(f"{folder / WEIGHTS_INDEX_FILE} lists tensors its shards lack: {', '.join(absent)}")
        return state
    pickled = [name for name in PICKLED_WEIGHTS_FILES if (folder / name).is_file()]
    if pickled:
        raise ValueError(f"{folder} holds its weights only as {pickled[0]}, a pickle clip-ray does not load (it can "
                         f"run code); save them as safetensors (save_pretrained(..., safe_serialization=True))")
    raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")


def read_hf_folder(path: str) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """(OpenAI-layout weights, ModelConfig, facts) of a local CLIPModel folder (config.json +
    model.safetensors, or sharded safetensors with their index).

    facts: vocab_size, bos/eos/pad token ids (the tokenizer files' when present), legacy_argmax_pooling
    (the config's eos_token_id is 2: HF pools at the largest id, CLIP's end token 49407), context_length and
    image_size, for the caller's tokenizer check.
    """
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    hf_config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    config = model_config_from_hf(hf_config, name=folder.name or "hf")
    state = state_dict_from_hf(_read_safetensors_weights(folder), config)
    text = _sub_config(hf_config, "text_config", HF_TEXT_DEFAULTS)
    legacy = text.get("eos_token_id") == HF_LEGACY_EOS_ID
    ids = _special_ids(folder, text, config.text.vocab_size)
    facts = {"vocab_size": config.text.vocab_size, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
             "pad_token_id": ids["pad"], "legacy_argmax_pooling": legacy,
             "context_length": config.text.context_length, "image_size": config.vision.image_size}
    return state, config, facts
