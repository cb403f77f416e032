"""What scores one mixture: the evaluation suite (SuiteMixtures) or a training config's own evaluation
(ConfigMixtures). Both are set up once with the mixtures' architecture and tokenizer, then called per alpha."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from clip_ray.config import Config, ModelConfig, to_dict
from clip_ray.config.suite import SuiteConfig
from clip_ray.driver.suite import evaluate_suite
from clip_ray.driver.wise_ft.mixing import alpha_name, build_mixture, save_mixture_file
from clip_ray.eval.evaluate import Evaluator
from clip_ray.inference.models import resolve_model
from clip_ray.model.tokenizer import load_tokenizer
from clip_ray.tracking.run import flatten_params
from clip_ray.worker.checkpoint import MODEL_FILE

ALPHAS_DIR = "alphas"


class MixtureEvaluation(Protocol):
    """What scores the mixtures: `setup` once, then one call per alpha, returning {metric name: value}."""

    describes: str  # what it evaluates on, for the MLflow params

    def setup(self, model_config: ModelConfig, tokenizer_path: str, output: Path) -> None: ...

    def __call__(self, alpha: float, weights: dict[str, torch.Tensor]) -> dict[str, float]: ...

    def params(self) -> dict[str, str]: ...


@dataclass
class SuiteMixtures:
    """Each mixture written to alphas/alpha-X/model.pt, resolved and run through the evaluation suite, whose
    results files go beside it; the weights file is removed afterwards unless `keep_mixtures`."""

    suite: SuiteConfig
    keep_mixtures: bool = False
    describes: str = "suite"
    model_config: ModelConfig | None = field(default=None, init=False)
    tokenizer_path: str | None = field(default=None, init=False)
    output: Path | None = field(default=None, init=False)

    def setup(self, model_config: ModelConfig, tokenizer_path: str, output: Path) -> None:
        self.model_config, self.tokenizer_path, self.output = model_config, tokenizer_path, output

    def __call__(self, alpha: float, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        folder = self.output / ALPHAS_DIR / alpha_name(alpha)
        path = save_mixture_file(folder / MODEL_FILE, self.model_config, weights)
        try:
            mixture = resolve_model(str(path), self.tokenizer_path)
            outcome = evaluate_suite(self.suite, mixture, output=str(folder), log_to_mlflow=False)
        finally:
            if not self.keep_mixtures:
                path.unlink(missing_ok=True)
        return outcome.metrics

    def params(self) -> dict[str, str]:
        return flatten_params(to_dict(self.suite), "suite")


@dataclass
class ConfigMixtures:
    """Each mixture built in this process and measured by the training run's own evaluation (the Evaluator
    on the prepared config's data.val and zero-shot folder), the validation data read through Ray Data."""

    config: Config  # prepared (clip_ray.driver.prepare.prepare_job)
    device: str | None = None
    describes: str = "config"
    evaluator: Evaluator | None = field(default=None, init=False)

    def setup(self, model_config: ModelConfig, tokenizer_path: str, output: Path) -> None:
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = copy.deepcopy(self.config)
        config.model = copy.deepcopy(model_config)  # image size and context length are the model's
        config.data.tokenizer = tokenizer_path  # the models' own, whatever the config names
        config.train.precision = "fp32" if device.type == "cpu" else config.train.precision
        tokenizer = load_tokenizer(tokenizer_path, model_config.text.context_length)
        self.config = config
        self.evaluator = Evaluator(config, tokenizer, device)

    def __call__(self, alpha: float, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        model = build_mixture(self.config.model, weights).to(self.evaluator.device)
        return {name: value for name, value in self.evaluator(model).items() if name != "eval/seconds"}

    def params(self) -> dict[str, str]:
        return {**flatten_params(to_dict(self.config.data), "data"), **flatten_params(to_dict(self.config.eval),
                                                                                       "eval")}
