"""What each `clip-ray export` format writes: the files, and how its users load them.

Every writer takes the same `ExportBundle` (OpenAI-layout float32 weights, the architecture, the tokenizer)
and a fresh folder, writes its files there and returns a `Written`: the files, a loading snippet, notes
and any checks it ran. clip_ray/driver/export.py adds the manifest and README and puts the folder in place.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clip_ray.config import ModelConfig
from clip_ray.data.stream.preprocess import CLIP_MEAN, CLIP_STD
from clip_ray.driver.export_tokenizer import (
    CLIP_BPE_PADDING, DIFFERENCES, USAGE, write_transformers_tokenizer,
)
from clip_ray.inference.safetensors_export import SAFETENSORS_CONFIG, SAFETENSORS_WEIGHTS
from clip_ray.model.tokenizer import TRAINED_FILENAME, ClipTokenizer, Tokenizer, TrainedBpeTokenizer

OPENCLIP_WEIGHTS = "open_clip_model.safetensors"
OPENCLIP_CONFIG = "open_clip_config.json"  # {"model_cfg", "preprocess_cfg"}, as OpenCLIP's Hub repos hold
PREPROCESSING = (f"RGB, the centre square resized to SxS (bicubic), pixels / 255, normalised with mean {CLIP_MEAN} "
                 f"and std {CLIP_STD}")


@dataclass
class ExportBundle:
    """One model as every writer sees it."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # OpenAI layout, float32, CPU
    tokenizer: Tokenizer
    dtype: torch.dtype = torch.float32  # of the weight files; ONNX graphs stay float32
    onnx_tolerance: float = 1e-4
    check_images: torch.Tensor | None = None  # the batch the ONNX graphs are checked on (None: seeded noise)

    def weights(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """`state` (default the bundle's) with floating tensors in the export dtype, each contiguous."""
        state = self.state_dict if state is None else state
        return {name: (t.to(self.dtype) if t.is_floating_point() else t).contiguous() for name, t in state.items()}

    def build_model(self) -> torch.nn.Module:
        from clip_ray.model import build_model

        model = build_model(self.model_config, device="meta")
        model.load_state_dict(self.state_dict, strict=True, assign=True)
        return model.float().eval()


@dataclass
class Written:
    """What a writer produced, for the manifest and README."""

    files: list[Path]
    load: str  # a Python snippet; "{folder}" stands for the format's folder
    notes: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    # transformers and OpenCLIP read "format": "pt" as PyTorch tensors.
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def _clip_ray_tokenizer_files(tokenizer: Tokenizer, folder: Path) -> list[Path]:
    """The tokenizer as clip-ray (and OpenCLIP's SimpleTokenizer) read it; a trained one's tokenizer.json also
    carries the normalizer and start/end template transformers needs (clip-ray ignores both)."""
    if isinstance(tokenizer, TrainedBpeTokenizer):
        return write_transformers_tokenizer(tokenizer, folder)
    return [tokenizer.save(folder)]


def _json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- safetensors


def write_safetensors(bundle: ExportBundle, folder: Path) -> Written:
    architecture = bundle.model_config.architecture()
    files = [_save_safetensors(bundle.weights(), folder / SAFETENSORS_WEIGHTS),
             _json(folder / SAFETENSORS_CONFIG, architecture),
             *_clip_ray_tokenizer_files(bundle.tokenizer, folder)]
    load = ("from clip_ray.inference.safetensors_export import load_safetensors_export\n"
            "from clip_ray.model.tokenizer import load_tokenizer\n"
            "model = load_safetensors_export('{folder}')  # a clip-ray CLIP in eval mode, float32\n"
            "tokenizer = load_tokenizer('{folder}', model.config.text.context_length)\n"
            "# or start a training run from it: model.init_from: {folder}/model.safetensors")
    return Written(files, load, [f"weights in OpenAI's layout (the keys of OpenAI's and OpenCLIP's CLIP); "
                                 f"{SAFETENSORS_CONFIG} is clip-ray's ModelConfig"])


# --------------------------------------------------------------------------- OpenCLIP


def openclip_name(config: ModelConfig) -> str:
    """The name the plain config file registers under open_clip.add_model_config (never a built-in's)."""
    return "clip-ray-" + re.sub(r"[^A-Za-z0-9._-]+", "-", config.name).strip("-")


def write_openclip(bundle: ExportBundle, folder: Path) -> Written:
    from clip_ray.model.interop.openclip import openclip_model_config

    tokenizer = bundle.tokenizer
    model_cfg = openclip_model_config(bundle.model_config, eos_token_id=tokenizer.eot_token_id)
    notes = []
    if isinstance(tokenizer, TrainedBpeTokenizer):
        # OpenCLIP's own tokenizer is CLIP's BPE; with a name here, get_tokenizer('local-dir:...') loads this
        # folder's tokenizer files through transformers (HFTokenizer).
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(folder.name)
        notes.append("OpenCLIP tokenizes with transformers from this folder's tokenizer.json (its HFTokenizer: "
                     "get_tokenizer('local-dir:<folder>')); " + DIFFERENCES)
    preprocess_cfg = {"size": bundle.model_config.vision.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    name = openclip_name(bundle.model_config)
    files = [_save_safetensors(bundle.weights(), folder / OPENCLIP_WEIGHTS),
             _json(folder / OPENCLIP_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}),
             _json(folder / f"{name}.json", model_cfg),
             *_clip_ray_tokenizer_files(tokenizer, folder)]
    load = ("import open_clip\n"
            "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{folder}')\n"
            "tokenizer = open_clip.get_tokenizer('local-dir:{folder}')\n"
            "# or by name: open_clip.add_model_config('{folder}/%s.json')\n"
            "#   model = open_clip.create_model('%s', pretrained='{folder}/%s')" % (name, name, OPENCLIP_WEIGHTS))
    return Written(files, load, notes, extra={"open_clip_model_name": name})


# --------------------------------------------------------------------------- Hugging Face transformers


def _hf_tokenizer(bundle: ExportBundle) -> tuple[dict[str, torch.Tensor], Tokenizer, int]:
    """(OpenAI-layout weights, tokenizer, pad id) as the CLIPModel needs them: a trained tokenizer's end token
    moves off id 2 (which CLIPModel reads as its legacy argmax flag), in the embedding and the tokenizer alike."""
    from clip_ray.model.interop.hf import HF_LEGACY_EOS_ID, relocate_eot_for_hf

    tokenizer = bundle.tokenizer
    if isinstance(tokenizer, ClipTokenizer):
        return bundle.state_dict, tokenizer, tokenizer.eot_token_id  # padded with the end token, as the Hub's
    if tokenizer.eot_token_id != HF_LEGACY_EOS_ID:
        return bundle.state_dict, tokenizer, tokenizer.pad_token_id
    from tokenizers import Tokenizer as RustTokenizer

    state, spec, _ = relocate_eot_for_hf(bundle.state_dict, json.loads(tokenizer.backend.to_str()))
    moved = TrainedBpeTokenizer(RustTokenizer.from_str(json.dumps(spec)), tokenizer.context_length)
    return state, moved, moved.pad_token_id


def write_hf(bundle: ExportBundle, folder: Path) -> Written:
    from clip_ray.model.interop.hf import CONFIG_FILE, WEIGHTS_FILE, hf_config_from_model_config, state_dict_to_hf

    state, tokenizer, pad_id = _hf_tokenizer(bundle)
    config = hf_config_from_model_config(bundle.model_config, bos_token_id=tokenizer.sot_token_id,
                                         eos_token_id=tokenizer.eot_token_id, pad_token_id=pad_id)
    config["dtype"] = str(bundle.dtype).removeprefix("torch.")
    hf_state = state_dict_to_hf(bundle.weights(state), bundle.model_config)
    size = bundle.model_config.vision.image_size
    files = [_save_safetensors(hf_state, folder / WEIGHTS_FILE), _json(folder / CONFIG_FILE, config),
             _json(folder / "preprocessor_config.json", {
                 "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
                 "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
                 "do_center_crop": True, "crop_size": {"height": size, "width": size},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True}),
             *write_transformers_tokenizer(tokenizer, folder)]
    if isinstance(tokenizer, ClipTokenizer):
        files.append(tokenizer.save(folder))  # the merges file, for clip-ray's --tokenizer
    notes = [f"call the tokenizer as {USAGE.format(context_length=tokenizer.context_length)}; " + DIFFERENCES]
    if isinstance(tokenizer, ClipTokenizer):
        notes.append(CLIP_BPE_PADDING)
    elif tokenizer.eot_token_id != bundle.tokenizer.eot_token_id:
        notes.append(f"the end token moved from id {bundle.tokenizer.eot_token_id} to {tokenizer.eot_token_id} "
                     "(transformers reads eos_token_id 2 as its legacy argmax pooling), in the token embedding and "
                     f"in {TRAINED_FILENAME} alike: use this folder's tokenizer with these weights")
    load = ("import transformers\n"
            "model = transformers.CLIPModel.from_pretrained('{folder}')\n"
            "processor = transformers.CLIPProcessor.from_pretrained('{folder}')\n"
            "inputs = processor(text=texts, images=images, return_tensors='pt', padding='max_length',\n"
            "                   truncation=True)\n"
            "outputs = model(**inputs)  # outputs.image_embeds, outputs.text_embeds: unit norm")
    return Written(files, load, notes, extra={"eos_token_id": tokenizer.eot_token_id, "pad_token_id": pad_id})


# --------------------------------------------------------------------------- ONNX


def write_onnx(bundle: ExportBundle, folder: Path) -> Written:
    from clip_ray.driver.export_onnx import export_onnx

    files, checks = export_onnx(bundle.build_model(), bundle.tokenizer, folder, tolerance=bundle.onnx_tolerance,
                                images=bundle.check_images)
    files += _clip_ray_tokenizer_files(bundle.tokenizer, folder)
    size, length = bundle.model_config.vision.image_size, bundle.model_config.text.context_length
    load = ("import onnxruntime\n"
            "images = onnxruntime.InferenceSession('{folder}/image_encoder.onnx')\n"
            "features = images.run(None, {'images': pixels})[0]  # float32 [N, 3, %d, %d] -> unit-norm [N, %d]\n"
            "texts = onnxruntime.InferenceSession('{folder}/text_encoder.onnx')\n"
            "features = texts.run(None, {'tokens': tokens})[0]  # int64 [N, %d] from the tokenizer here"
            % (size, size, bundle.model_config.embed_dim, length))
    notes = [f"images: {PREPROCESSING.replace('SxS', f'{size}x{size}')}",
             f"tokens: [sot] ids [eot] then pad id {bundle.tokenizer.pad_token_id} up to {length}, as clip-ray's "
             "tokenizer writes them: clip_ray.model.tokenizer.load_tokenizer(folder)(texts)"
             + (", or open_clip.tokenize(texts, context_length=%d)" % length
                if isinstance(bundle.tokenizer, ClipTokenizer) else
                "; transformers' PreTrainedTokenizerFast loads tokenizer.json here too (" + DIFFERENCES + ")"),
             "the graphs compute in float32 whatever --dtype the weight files have"]
    return Written(files, load, notes, [check.as_dict() for check in checks], {"tolerance": bundle.onnx_tolerance})


WRITERS = {"openclip": write_openclip, "hf": write_hf, "onnx": write_onnx, "safetensors": write_safetensors}


def copy_into(files: list[Path], source: Path, target: Path) -> None:
    """Copies `files` (under `source`) to the same relative places under `target`."""
    for path in files:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
