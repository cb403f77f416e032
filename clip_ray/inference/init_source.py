"""Reading the weights a training run starts from (`model.init_from`), whatever project wrote them.

A source is one of
- a file: an OpenAI/OpenCLIP state dict (.pt/.pth/.bin, read with weights_only; an OpenCLIP training
  checkpoint's "state_dict" with DDP's "module." prefix too), OpenAI's TorchScript archive (its weights
  read without running its pickle: model/interop/torchscript.py), a .safetensors file (OpenAI layout;
  a model_config.json beside it, as `clip-ray export --to safetensors` writes, gives its config), or a
  clip-ray model.pt;
- a folder: a Hugging Face CLIPModel (config.json + model.safetensors: names and layouts converted), or a
  clip-ray checkpoint or run directory (its latest checkpoint);
- an MLflow model clip-ray logged (its torch.export program's weights; a pickled model is refused).
Local paths or any pyarrow URI. What the source says about its tokenizer comes back as `TokenizerFacts`,
so the driver can refuse a run whose tokenizer does not match the weights' vocabulary.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import torch

from clip_ray.config import ConfigError, ModelConfig, from_dict
from clip_ray.inference.mlflow_models import (
    exported_program_state_dict, is_mlflow_uri, load_exported_program, mlflow_facts,
)
from clip_ray.inference.models import checkpoint_directory
from clip_ray.inference.sources import ModelSourceError, local_copy, tokenizer_file
from clip_ray.model.interop import CLIP_BPE_EOT_ID, CLIP_BPE_SOT_ID
from clip_ray.model.tokenizer import CLIP_VOCAB_SIZE, Tokenizer, load_tokenizer
from clip_ray.storage import basename, is_uri, join, local_absolute, resolve

log = logging.getLogger("clip_ray.inference")

HF_CONFIG_FILE = "config.json"
EXPORTED_CONFIG_FILE = "model_config.json"


@dataclass
class TokenizerFacts:
    """What the weights' source says about the tokenizer they were trained with."""

    vocab_size: int | None  # rows of the token embedding
    sot_token_id: int | None = None
    eot_token_id: int | None = None
    tokenizer_path: str | None = None  # the source's own tokenizer file, where it has one


@dataclass
class InitialWeights:
    """A source's weights in OpenAI's layout, with what it knows about itself."""

    source: str
    kind: str  # "state_dict" | "torchscript" | "safetensors" | "huggingface" | "checkpoint" | "mlflow"
    state_dict: dict[str, torch.Tensor]
    model_config: ModelConfig | None  # None: a bare state dict, whose activation and heads nobody recorded
    tokenizer: TokenizerFacts
    details: dict = field(default_factory=dict)


def _is_dir(path: str) -> bool:
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound and not is_uri(path):
        raise ConfigError(f"model.init_from={path!r}: no such file or folder")
    return info.type == pafs.FileType.Directory or (is_uri(path) and info.type == pafs.FileType.NotFound)


def _exists(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def _copy_folder(path: str, scratch: Path) -> Path:
    """The files directly in a (remote) folder, copied into scratch."""
    fs, inner = resolve(path)
    target = scratch / "folder"
    target.mkdir()
    for info in fs.get_file_info(pafs.FileSelector(inner)):
        if info.type == pafs.FileType.File:
            local_copy(join(path, info.base_name), target)
    return target


def _facts_from_weights(state_dict: dict, tokenizer_path: str | None = None) -> TokenizerFacts:
    embedding = state_dict.get("token_embedding.weight")
    vocab = None if embedding is None else int(embedding.shape[0])
    if vocab == CLIP_VOCAB_SIZE and tokenizer_path is None:
        return TokenizerFacts(vocab, CLIP_BPE_SOT_ID, CLIP_BPE_EOT_ID)
    return TokenizerFacts(vocab, tokenizer_path=tokenizer_path)


def _read_state_dict_file(local: str) -> tuple[dict, ModelConfig | None, str]:
    """(weights, config or None, kind) of one local weights file."""
    from clip_ray.model.interop.openclip import state_dict_from_openclip
    from clip_ray.model.interop.torchscript import is_torchscript_archive, read_torchscript_state_dict

    if local.endswith(".safetensors"):
        from safetensors.torch import load_file

        beside = Path(local).with_name(EXPORTED_CONFIG_FILE)
        config = from_dict(ModelConfig, json.loads(beside.read_text())) if beside.is_file() else None
        return load_file(local), config, "safetensors"
    if is_torchscript_archive(local):
        # OpenCLIP's traced models keep their causal-mask buffer, which clip-ray computes instead
        return state_dict_from_openclip(read_torchscript_state_dict(local)), None, "torchscript"
    try:
        payload = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # the unpickler's refusal names the global it met
        raise ConfigError(f"model.init_from={local!r}: not a weights file torch.load(weights_only=True) can read "
                          f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if isinstance(payload, dict) and "model_config" in payload and "state_dict" in payload:  # clip-ray's model.pt
        config = payload["model_config"]
        return payload["state_dict"], from_dict(ModelConfig, config) if config else None, "state_dict"
    if not isinstance(payload, dict):
        raise ConfigError(f"model.init_from={local!r}: holds {type(payload).__name__}, not a state dict")
    try:  # a bare state dict, or an OpenCLIP training checkpoint (DDP/compile prefixes dropped)
        return state_dict_from_openclip(payload), None, "state_dict"
    except ValueError as err:
        raise ConfigError(f"model.init_from={local!r}: not a state dict ({err})") from None


def _read_file(source: str, scratch: Path) -> InitialWeights:
    local = local_copy(source, scratch)
    if is_uri(source) and source.endswith(".safetensors"):  # its config, where the export put one beside it
        config_uri = join(source.rsplit("/", 1)[0], EXPORTED_CONFIG_FILE)
        if _exists(config_uri):
            local_copy(config_uri, scratch)
    state_dict, config, kind = _read_state_dict_file(local)
    tokenizer = None
    for name in ("tokenizer.json", "bpe_simple_vocab_16e6.txt.gz"):  # what clip-ray's exports put beside weights
        if (Path(local).parent / name).is_file() and not is_uri(source):
            tokenizer = str(Path(local).parent / name)
    return InitialWeights(source, kind, dict(state_dict), config, _facts_from_weights(state_dict, tokenizer))


def _read_huggingface(source: str, scratch: Path) -> InitialWeights:
    from clip_ray.model.interop.hf import read_hf_folder

    local = _copy_folder(source, scratch) if is_uri(source) else Path(source)
    state_dict, config, facts = read_hf_folder(str(local))
    tokenizer = TokenizerFacts(facts.get("vocab_size"), facts.get("bos_token_id"), facts.get("eos_token_id"))
    return InitialWeights(source, "huggingface", state_dict, config, tokenizer, details=facts)


def _read_checkpoint(source: str, scratch: Path) -> InitialWeights:
    from clip_ray.worker.checkpoint import load_training_state

    directory = checkpoint_directory(source, scratch)
    state = load_training_state(directory, mmap=True)
    config = from_dict(ModelConfig, state["model_config"]) if state["model_config"] else None
    tokenizer = ((state.get("config") or {}).get("data") or {}).get("tokenizer")
    if tokenizer and not Path(tokenizer).is_file():
        log.warning("model.init_from=%s: its run's tokenizer %s is not here, so only the vocabulary size is checked",
                    source, tokenizer)
        tokenizer = None
    return InitialWeights(source, "checkpoint", dict(state["model"]), config,
                          _facts_from_weights(state["model"], tokenizer),
                          details={"checkpoint": str(directory), "step": int(state["step"])})


def _read_mlflow(source: str, tracking_uri: str, scratch: Path) -> InitialWeights:
    location, config, tokenizer_dir, version = mlflow_facts(source, tracking_uri, scratch)
    state_dict = exported_program_state_dict(load_exported_program(location, tracking_uri))
    tokenizer = tokenizer_file(tokenizer_dir) if tokenizer_dir else None
    return InitialWeights(source, "mlflow", state_dict, config, _facts_from_weights(state_dict, tokenizer),
                          details={"model_uri": location, **version})


def read_initial_weights(source: str, tracking_uri: str | None, scratch: Path) -> InitialWeights:
    """The weights at `source` (see the module docstring); files a remote source needs go into `scratch`,
    which must outlive the tokenizer check."""
    if is_mlflow_uri(source):
        return _read_mlflow(source, tracking_uri, scratch)
    source = source if is_uri(source) else local_absolute(source)
    if not _is_dir(source):
        return _read_file(source, scratch)
    if _exists(join(source, HF_CONFIG_FILE)):
        return _read_huggingface(source, scratch)
    try:
        return _read_checkpoint(source, scratch)
    except ModelSourceError as err:
        raise ConfigError(f"model.init_from={source!r}: {err} (a folder must be a Hugging Face CLIPModel with "
                          f"{HF_CONFIG_FILE}, or a clip-ray checkpoint or run directory)") from None


def check_tokenizer(tokenizer: Tokenizer, tokenizer_path: str, facts: TokenizerFacts, source: str) -> None:
    """Refuses a run tokenizer that would feed the weights other ids than they were trained on."""
    where = f"data.tokenizer={tokenizer_path!r}"
    if facts.vocab_size is not None and tokenizer.vocab_size != facts.vocab_size:
        raise ConfigError(f"{where} has {tokenizer.vocab_size} tokens, the text tower of model.init_from={source!r} "
                          f"{facts.vocab_size}: use the tokenizer the weights were trained with")
    for name in ("sot_token_id", "eot_token_id"):
        expected = getattr(facts, name)
        if expected is not None and getattr(tokenizer, name) != expected:
            raise ConfigError(f"{where}: its {name} is {getattr(tokenizer, name)}, the weights of "
                              f"model.init_from={source!r} were trained with {expected}")
    if facts.tokenizer_path is not None:
        theirs = load_tokenizer(tokenizer_file(facts.tokenizer_path), tokenizer.context_length)
        if theirs.backend.get_vocab(with_added_tokens=True) != tokenizer.backend.get_vocab(with_added_tokens=True):
            raise ConfigError(f"{where}: its vocabulary differs from that of {facts.tokenizer_path}, the tokenizer "
                              f"model.init_from={source!r} was trained with")
    elif facts.vocab_size not in (None, CLIP_VOCAB_SIZE):
        log.warning("model.init_from=%s records no tokenizer: only its vocabulary size (%d) could be checked "
                    "against %s", source, facts.vocab_size, basename(tokenizer_path))
