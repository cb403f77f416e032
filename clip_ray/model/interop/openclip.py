"""OpenCLIP's model-config JSON <-> ModelConfig, and OpenCLIP checkpoints -> OpenAI layout.

OpenCLIP's `CLIP` class (a ViT or ModifiedResNet image tower and its own text Transformer) keeps OpenAI's
state-dict names, so the weights need no conversion: only the config does. A config is the JSON
`open_clip.add_model_config` registers ({"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", ...}).

Text pooling (OpenCLIP 3.3, transformer.py: text_global_pool): `pool_type` "argmax" reads the features at
the largest token id (CLIP's end token 49407 is the largest), "eos" at the first `eos_id`. clip-ray reads
them at the last token that is not the pad id. The exported config pools at the end token of clip-ray's
tokenizer: "argmax" when the end token is the vocabulary's last id (CLIP's BPE), else "eos" with its id
(a trained `bpe:N` tokenizer's 2). The two agree on every row clip-ray's tokenizers write (one end token,
then padding); they differ only for a text that spells the end token itself ("<end_of_text>").
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from clip_ray.config import ModelConfig, TextConfig, VisionConfig
from clip_ray.model.interop import default_special_ids

LAYER_NORM_EPS = 1e-5

# Settings clip-ray can build only at these values (OpenCLIP's defaults, or values that compute the same).
_VISION_FIXED: dict[str, tuple] = {
    "ls_init_value": (None,), "attentional_pool": (False,), "no_ln_pre": (False,), "pos_embed_type": ("learnable",),
    "pool_type": ("tok",), "act_kwargs": (None, {}), "block_type": (None, "default"), "qk_norm": (False,),
    "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
    "scale_fc": (False,), "timm_model_name": (None, ""),
}
_TEXT_FIXED: dict[str, tuple] = {
    "ls_init_value": (None,), "embed_cls": (False,), "no_causal_mask": (False,), "pool_type": ("argmax", "eos"),
    "proj_type": ("linear",), "proj_bias": (False,), "act_kwargs": (None, {}), "block_type": (None, "default"),
    "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
    "scale_attn": (False,), "scale_fc": (False,), "hf_model_name": (None, ""),
}
# Settings that do not change what the network computes here (pooling one token makes the final norm's place
# moot; timm_*/hf_* apply only to towers clip-ray refuses anyway; tokenizer choices are checked elsewhere).
_VISION_FREE = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout",
                "output_tokens", "final_ln_after_pool", "attn_pooler_queries", "attn_pooler_heads", "norm_kwargs",
                "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pad_id", "eos_id",
              "output_tokens", "final_ln_after_pool", "norm_kwargs", "hf_tokenizer_name", "tokenizer_mode",
              "tokenizer_kwargs", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TOP_LEVEL = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias",
              "custom_text"}


def _check_settings(cfg: Mapping[str, Any], key: str, fixed: dict[str, tuple], free: set[str]) -> None:
    for name, value in cfg.items():
        if name in fixed:
            if value not in fixed[name]:
                allowed = " or ".join(repr(v) for v in fixed[name])
                raise ValueError(f"{key}.{name}={value!r}: clip-ray builds only {allowed}")
        elif name not in free:
            raise ValueError(f"{key}.{name}: an OpenCLIP setting clip-ray does not know")
    eps = (cfg.get("norm_kwargs") or {}).get("eps", LAYER_NORM_EPS)
    extra = set(cfg.get("norm_kwargs") or {}) - {"eps"}
    if extra or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-9):
        raise ValueError(f"{key}.norm_kwargs={cfg.get('norm_kwargs')!r}: clip-ray's LayerNorms use eps "
                         f"{LAYER_NORM_EPS}")


def _square(value: Any, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{key}={list(value)}: clip-ray builds square images only")
        value = value[0]
    return int(value)


def _vision_from_openclip(cfg: Mapping[str, Any]) -> VisionConfig:
    _check_settings(cfg, "vision_cfg", _VISION_FIXED, _VISION_FREE)
    image_size = _square(cfg.get("image_size", 224), "vision_cfg.image_size")
    layers, width = cfg.get("layers", 12), int(cfg.get("width", 768))
    head_width = int(cfg.get("head_width", 64))
    if isinstance(layers, (list, tuple)):
        if len(layers) != 4:
            raise ValueError(f"vision_cfg.layers={list(layers)}: a ModifiedResNet has four stages")
        return VisionConfig(arch="resnet", image_size=image_size, width=width, resnet_layers=tuple(layers),
                            head_width=head_width)
    return VisionConfig(arch="vit", image_size=image_size, width=width, layers=int(layers),
                        patch_size=_square(cfg.get("patch_size", 16), "vision_cfg.patch_size"), head_width=head_width,
                        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)), patch_dropout=float(cfg.get("patch_dropout", 0.0)))


def _text_from_openclip(cfg: Mapping[str, Any]) -> TextConfig:
    _check_settings(cfg, "text_cfg", _TEXT_FIXED, _TEXT_FREE)
    width, heads = int(cfg.get("width", 512)), int(cfg.get("heads", 8))
    if heads <= 0 or width % heads:
        raise ValueError(f"text_cfg.heads={heads} does not divide text_cfg.width={width}")
    return TextConfig(context_length=int(cfg.get("context_length", 77)), vocab_size=int(cfg.get("vocab_size", 49408)),
                      width=width, layers=int(cfg.get("layers", 12)), head_width=width // heads,
                      mlp_ratio=float(cfg.get("mlp_ratio", 4.0)), pad_token_id=int(cfg.get("pad_id", 0)))


def model_config_from_openclip(cfg: dict, name: str = "openclip") -> ModelConfig:
    """The ModelConfig of an OpenCLIP model-config dict; a tower or setting clip-ray cannot build (timm or
    HF towers, layer scale, attentional pooling, a CoCa decoder, ...) is a ValueError naming the key.

    The text pad id is the config's pad_id; clip-ray pools at the last non-pad token, where OpenCLIP's
    "argmax"/"eos" pooling also lands for rows of one end token followed by padding (see the module docstring).
    """
    for key in cfg:
        if key not in _TOP_LEVEL:
            raise ValueError(f"{key}: an OpenCLIP model setting clip-ray cannot build (e.g. multimodal_cfg is CoCa's "
                             "text decoder)")
    if "embed_dim" not in cfg:
        raise ValueError("embed_dim is missing: not an OpenCLIP model config")
    config = ModelConfig(name=name, embed_dim=int(cfg["embed_dim"]), vision=_vision_from_openclip(cfg["vision_cfg"]),
                         text=_text_from_openclip(cfg["text_cfg"]),
                         activation="quick_gelu" if cfg.get("quick_gelu", False) else "gelu")
    if "init_logit_scale" in cfg:
        config.init_logit_scale = float(cfg["init_logit_scale"])
    if cfg.get("init_logit_bias") is not None:
        config.init_logit_bias = float(cfg["init_logit_bias"])
    return config


def openclip_model_config(config: ModelConfig, *, eos_token_id: int | None = None) -> dict:
    """OpenCLIP's model-config dict of a clip-ray model: `open_clip.create_model(name)` after
    `open_clip.add_model_config(<name>.json)` builds a network with the same state-dict names and shapes.

    eos_token_id: the end token of the tokenizer the model is used with; by default that of clip-ray's
    tokenizer for its vocabulary (49407 for CLIP's BPE, 2 for a trained `bpe:N`). It decides the pooling.
    """
    vision, text = config.vision, config.text
    if vision.arch == "vit":
        vision_cfg: dict[str, Any] = {"image_size": vision.image_size, "layers": vision.layers, "width": vision.width,
                                      "patch_size": vision.patch_size, "head_width": vision.head_width,
                                      "mlp_ratio": vision.mlp_ratio}
        if vision.patch_dropout > 0:
            vision_cfg["patch_dropout"] = vision.patch_dropout
    else:
        vision_cfg = {"image_size": vision.image_size, "layers": list(vision.resnet_layers), "width": vision.width,
                      "head_width": vision.head_width, "patch_size": None}
    eos = default_special_ids(text)[1] if eos_token_id is None else eos_token_id
    text_cfg: dict[str, Any] = {"context_length": text.context_length, "vocab_size": text.vocab_size,
                                "width": text.width, "heads": text.width // text.head_width, "layers": text.layers,
                                "mlp_ratio": text.mlp_ratio, "pad_id": text.pad_token_id}
    if eos == text.vocab_size - 1:
        text_cfg["pool_type"] = "argmax"
    else:
        text_cfg.update(pool_type="eos", eos_id=eos)
    out: dict[str, Any] = {"embed_dim": config.embed_dim, "quick_gelu": config.activation == "quick_gelu",
                           "vision_cfg": vision_cfg, "text_cfg": text_cfg, "init_logit_scale": config.init_logit_scale}
    if config.init_logit_bias is not None:
        out["init_logit_bias"] = config.init_logit_bias
    return out


def state_dict_from_openclip(payload: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """OpenAI-layout weights of an OpenCLIP checkpoint: a bare state dict or a training checkpoint's
    {"state_dict": ...}; DDP's `module.` and torch.compile's `_orig_mod.` prefixes dropped, a CustomTextCLIP's
    `text.` tower moved to the top level, the causal-mask buffer left out."""
    state = payload.get("state_dict", payload)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for prefix in ("module.", "_orig_mod."):
            name = name.removeprefix(prefix)
        name = name.removeprefix("text.")
        if name == "attn_mask":
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: holds {type(tensor).__name__}, not a tensor")
        out[name] = tensor
    return out
