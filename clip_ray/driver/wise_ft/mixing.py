"""Which two models can be mixed, the mixing ratios, and the mixtures: state dicts, model.pt files, checkpoints.

See clip_ray.driver.wise_ft for what is compared and why.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Sequence

import torch

from clip_ray.config import ConfigError, ModelConfig, to_dict
from clip_ray.config.model import TRAINING_ONLY_FIELDS
from clip_ray.inference.models import ModelSourceError, ResolvedModel, resolve_model
from clip_ray.model import build_model
from clip_ray.storage import is_uri
from clip_ray.tracking.run import flatten_params
from clip_ray.worker.checkpoint import save_training_state

log = logging.getLogger("clip_ray.wise_ft")

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
# Each alpha is logged to MLflow at step round(STEP_SCALE * alpha): 0..100, the fine-tuned share in percent.
STEP_SCALE = 100
# Config fields that do not change what the network computes from its weights (patch dropout and the initial
# temperature act in training only).
NON_ARCHITECTURE_FIELDS = tuple(f"model.{name}" for name in (
    "name", "grad_checkpointing", "vision.patch_dropout", "init_logit_scale", *TRAINING_ONLY_FIELDS))
# What a plain OpenAI-layout state dict does not record (its config assumes them): compared only between two
# models that record them, the fine-tuned model's taken for the mixtures.
UNRECORDED_BY_WEIGHTS = ("model.activation", "model.vision.head_width", "model.text.head_width",
                         "model.text.pad_token_id", "model.max_logit_scale")


class IncompatibleModelsError(ModelSourceError):
    """The two models cannot be mixed: another architecture, tokenizer or set of weights; the message says which."""


# --------------------------------------------------------------------------- checking


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """The mixing ratios, sorted; each in [0, 1] and on its own MLflow step (at least 0.01 apart)."""
    alphas = sorted({float(alpha) for alpha in alphas})
    if not alphas:
        raise ConfigError("--alphas: give at least one mixing ratio")
    for alpha in alphas:
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ConfigError(f"--alphas: {alpha} is not in [0, 1] (0 is the initial model, 1 the fine-tuned one)")
    steps = [alpha_step(alpha) for alpha in alphas]
    for (a, step_a), (b, step_b) in zip(zip(alphas, steps), zip(alphas[1:], steps[1:])):
        if step_a == step_b:
            raise ConfigError(f"--alphas: {a} and {b} would both be MLflow step {step_a}; give ratios at least "
                              f"{1 / STEP_SCALE} apart")
    return alphas


def alpha_step(alpha: float) -> int:
    return round(alpha * STEP_SCALE)


def alpha_name(alpha: float) -> str:
    """The folder name of a mixture: alpha-0.50."""
    step = alpha_step(alpha)
    return f"alpha-{step // STEP_SCALE}.{step % STEP_SCALE:02d}"


def architecture_differences(initial: ModelConfig, finetuned: ModelConfig, ignore: Sequence[str] = ()) -> list[str]:
    """'model.vision.layers: 4 (initial) vs 6 (fine-tuned)' for each architecture field that differs."""
    skipped = {*NON_ARCHITECTURE_FIELDS, *ignore}
    first, second = ({key: value for key, value in flatten_params(to_dict(config), "model").items()
                      if key not in skipped} for config in (initial, finetuned))
    return [f"{key}: {first.get(key, '(absent)')} (initial) vs {second.get(key, '(absent)')} (fine-tuned)"
            for key in sorted(set(first) | set(second)) if first.get(key) != second.get(key)]


def is_plain_state_dict(model: ResolvedModel) -> bool:
    """A weights file without a clip-ray config: its head width, activation and pad id are assumed."""
    return model.kind == "file" and bool(model.state_dict_options)


def check_compatible(initial: ResolvedModel, finetuned: ResolvedModel) -> None:
    """Raises IncompatibleModelsError when the two models differ in architecture or tokenizer."""
    plain = is_plain_state_dict(initial) or is_plain_state_dict(finetuned)
    differences = architecture_differences(initial.model_config, finetuned.model_config,
                                           UNRECORDED_BY_WEIGHTS if plain else ())
    if differences:
        raise IncompatibleModelsError(f"--initial {initial.source} and --finetuned {finetuned.source} have "
                                      f"different architectures: {'; '.join(differences)}")
    if initial.tokenizer_sha256 != finetuned.tokenizer_sha256:
        raise IncompatibleModelsError(
            f"--initial {initial.source} and --finetuned {finetuned.source} use different tokenizers: "
            f"{initial.tokenizer_path} (sha256 {initial.tokenizer_sha256[:12]}) vs {finetuned.tokenizer_path} "
            f"(sha256 {finetuned.tokenizer_sha256[:12]}); fine-tuning keeps the tokenizer, or pass --tokenizer")


def check_state_dicts(initial: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> None:
    """Raises IncompatibleModelsError naming the first tensor that one model lacks or holds in another shape."""
    for name in sorted(set(initial) ^ set(finetuned)):
        side = "initial" if name in initial else "fine-tuned"
        raise IncompatibleModelsError(f"tensor {name}: only the {side} model has it")
    for name in sorted(initial):
        if initial[name].shape != finetuned[name].shape:
            raise IncompatibleModelsError(f"tensor {name}: shape {tuple(initial[name].shape)} (initial) vs "
                                          f"{tuple(finetuned[name].shape)} (fine-tuned)")


def mixture_config(initial: ResolvedModel, finetuned: ResolvedModel) -> ModelConfig:
    """The mixtures' architecture: the fine-tuned model's, unless only the initial one records it in full."""
    if is_plain_state_dict(finetuned) and not is_plain_state_dict(initial):
        return initial.model_config
    return finetuned.model_config


def resolve_pair(initial: str, finetuned: str, tokenizer: str | None = None, tracking_uri: str | None = None,
                 activation: str = "quick_gelu") -> tuple[ResolvedModel, ResolvedModel]:
    """Both models pinned (see clip_ray.inference.models) and checked to be mixable. `tokenizer` is both models';
    without it each brings its own, and one that records none (a model.pt, a state dict) takes the other's."""
    resolved, errors = {}, {}
    for role, source in (("initial", initial), ("finetuned", finetuned)):
        try:
            resolved[role] = resolve_model(source, tokenizer, tracking_uri, activation)
        except ModelSourceError as err:
            errors[role] = (source, err)
    if tokenizer is None and len(errors) == 1 and len(resolved) == 1:
        (role, (source, error)), (other,) = errors.popitem(), resolved.values()
        if is_uri(other.tokenizer_path) or other.tokenizer_path.startswith("runs:/"):
            raise error
        try:
            resolved[role] = resolve_model(source, other.tokenizer_path, tracking_uri, activation)
        except ModelSourceError:
            raise error from None
        log.info("%s names no tokenizer: using %s's, %s", source, other.source, other.tokenizer_path)
    if errors:
        raise next(iter(errors.values()))[1]
    pair = resolved["initial"], resolved["finetuned"]
    check_compatible(*pair)
    return pair


# --------------------------------------------------------------------------- mixing


def mix_state_dicts(initial: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                    alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * initial + alpha * finetuned for every floating-point tensor, in float32 (alpha 0 and 1 give
    the two weight sets exactly); integer buffers (counters) are the fine-tuned model's."""
    mixture = {}
    for name, tuned in finetuned.items():
        start = initial[name]
        if not tuned.is_floating_point():
            mixture[name] = tuned.clone()
        elif alpha == 0.0:
            mixture[name] = start.float().clone()
        elif alpha == 1.0:
            mixture[name] = tuned.float().clone()
        else:
            mixture[name] = (1.0 - alpha) * start.float() + alpha * tuned.float()
    return mixture


def build_mixture(model_config: ModelConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CLIP of `model_config` holding `weights` (strictly: every tensor, no other), in eval mode."""
    model = build_model(model_config, device="meta")
    model.load_state_dict(weights, strict=True, assign=True)
    return model.float().eval()


def save_mixture_file(path: Path, model_config: ModelConfig, weights: dict[str, torch.Tensor]) -> Path:
    """A model.pt as checkpoints hold it ({"model_config", "state_dict"}): `resolve_model` reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": to_dict(model_config), "state_dict": weights}, path)
    return path


def save_mixture_checkpoint(directory: Path, model_config: ModelConfig, weights: dict[str, torch.Tensor],
                            tokenizer_path: str, about: dict) -> Path:
    """A complete checkpoint directory whose run config names the tokenizer beside it, so `clip-ray eval
    DIR`, `clip-ray embed --model DIR` and `model.init_from: DIR` need nothing else. It holds no optimiser
    state: it is a model to use or to start a new run from, not a run to resume."""
    return save_training_state(directory, model=build_model(model_config, device="meta"), optimizer=None, step=0,
                               state_dicts=(weights, {}),
                               config={"data": {"tokenizer": tokenizer_path}, "wise_ft": about})


def copy_tokenizer(model: ResolvedModel, folder: Path) -> str:
    """The model's tokenizer copied byte for byte into `folder` (saved anew when it is an MLflow artifact)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = model.tokenizer_path
    if not is_uri(source) and not source.startswith("runs:/") and Path(source).is_file():
        target = folder / Path(source).name
        if Path(source).resolve() != target.resolve():
            shutil.copyfile(source, target)
        return str(target)
    return str(model.tokenizer.save(folder))
