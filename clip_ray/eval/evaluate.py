"""Everything measured on a model during and after training, in one pass per data set.

- validation contrastive loss over batches of exactly `eval.batch_size` pairs
  (a loss depends on its batch size, so runs only compare at a fixed one);
- retrieval recall@k both ways on the same pairs, captions grouped by photo;
- zero-shot top-1/top-5 on an ImageFolder with a prompt-template ensemble.

Validation pairs stream through the Ray Data eval pipeline; the zero-shot images
are read and preprocessed in-process (a few thousand small files).
"""

from __future__ import annotations

import itertools
import time
from typing import Iterator

import numpy as np
import torch
from torch import nn

from clip_ray.config import Config
from clip_ray.data.formats import BadSample, FailureCounts, Sample, read_image_folder
from clip_ray.data.stream.pipeline import build_eval_dataset, eval_batches
from clip_ray.data.stream.preprocess import Preprocessor, normalize
from clip_ray.eval.retrieval import retrieval_recall
from clip_ray.eval.templates import load_class_names, load_templates
from clip_ray.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier
from clip_ray.loss import build_loss
from clip_ray.model.precision import autocast_context


class Evaluator:
    """Holds what evaluation needs (tokenizer, class names, templates) and runs it on a model."""

    def __init__(self, config: Config, tokenizer, device: torch.device):
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = config.model.text.context_length
        self.image_size = config.model.vision.image_size
        self.loss_fn = build_loss(config.train.loss, gather=False)
        self._val_dataset = None
        self.class_names: list[str] = []
        self.templates: list[str] = []
        zeroshot_dir = config.data.zeroshot_dir
        if zeroshot_dir:
            names_file = config.eval.zeroshot_class_names
            self.class_names = load_class_names(names_file or zeroshot_dir)
            self.templates = load_templates(config.eval.zeroshot_templates)

    # ------------------------------------------------------------------ helpers

    def _autocast(self):
        return autocast_context(self.config.train.precision, self.device.type)

    def _encode_images(self, model, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return model.encode_image(images.to(self.device, non_blocking=True)).float()

    def _encode_texts(self, model, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return model.encode_text(tokens.to(self.device, non_blocking=True)).float()

    def val_dataset(self):
        if self._val_dataset is None and self.config.data.val:
            dataset = build_eval_dataset(self.config.data, self.image_size, self.context_length)
            if self.config.eval.max_val_samples:
                dataset = dataset.limit(self.config.eval.max_val_samples)
            # A pass over the held-out pairs takes seconds: its progress block would only say "0 rows".
            dataset.context.enable_progress_bars = False
            self._val_dataset = dataset
        return self._val_dataset

    # ------------------------------------------------------------------ the measurements

    @torch.no_grad()
    def validation(self, model: nn.Module) -> dict[str, float]:
        """Validation loss at the fixed batch size, and retrieval recall, over data.val."""
        dataset = self.val_dataset()
        if dataset is None:
            return {}
        size = self.config.eval.batch_size
        image_rows: dict[str, int] = {}
        image_features, text_features, text_owner, losses = [], [], [], []
        for batch in eval_batches(dataset, size, device=None):
            images = self._encode_images(model, batch["image"])
            texts = self._encode_texts(model, batch["text"])
            if images.shape[0] == size:  # the fixed-size loss ignores a short last batch
                scale = model.logit_scale.exp().float()
                bias = getattr(model, "logit_bias", None)
                losses.append(float(self.loss_fn(images, texts, scale, bias)))
            for row, image_id in enumerate(batch["image_id"]):
                if image_id not in image_rows:
                    image_rows[image_id] = len(image_rows)
                    image_features.append(images[row])
                text_owner.append(image_rows[image_id])
            text_features.append(texts)
        if not text_features:
            return {}
        metrics = retrieval_recall(torch.stack(image_features), torch.cat(text_features),
                                   torch.tensor(text_owner), ks=self.config.eval.recall_at)
        metrics = {f"val/{name}": value for name, value in metrics.items()}
        if losses:
            metrics["val/loss"] = float(np.mean(losses))
        metrics["val/num_images"] = len(image_rows)
        metrics["val/num_captions"] = len(text_owner)
        return metrics

    def _zeroshot_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        preprocess = Preprocessor(self.image_size, self.context_length, self.tokenizer, train=False,
                                  max_pixels=self.config.data.max_pixels)
        counts = FailureCounts()
        labelled = read_image_folder(self.config.data.zeroshot_dir, counts)
        if self.config.eval.max_zeroshot_images:
            labelled = _spread_over_classes(labelled, self.config.eval.max_zeroshot_images, len(self.class_names))
        while chunk := list(itertools.islice(labelled, batch_size)):
            kept, images = [], []
            for item in chunk:
                sample = Sample(key=item.key, image=item.image, caption="", image_ext=item.image_ext,
                                source=item.source)
                try:
                    images.append(preprocess.image(sample))
                    kept.append(item.class_index)
                except BadSample as bad:  # skipped and counted, like every bad input
                    counts.reject(bad.reason, sample.source, sample.key, bad.detail)
            if images:
                pixels = np.stack(images).transpose(0, 3, 1, 2)
                yield torch.from_numpy(normalize(pixels)), torch.tensor(kept)

    @torch.no_grad()
    def zeroshot(self, model: nn.Module) -> dict[str, float]:
        """Top-1/top-5 accuracy over data.zeroshot_dir, and the chance level beside it."""
        if not self.class_names:
            return {}
        classifier = zeroshot_classifier(
            lambda tokens: self._encode_texts(model, tokens),
            lambda texts: self.tokenizer(texts, context_length=self.context_length),
            self.class_names, self.templates, self.device)
        features, labels = [], []
        for images, batch_labels in self._zeroshot_batches(self.config.eval.batch_size):
            features.append(self._encode_images(model, images))
            labels.append(batch_labels)
        if not features:
            return {}
        accuracy = zeroshot_accuracy(torch.cat(features), classifier, torch.cat(labels).to(self.device))
        metrics = {f"zeroshot/{name}": value for name, value in accuracy.items()}
        metrics["zeroshot/chance_top1"] = 1.0 / len(self.class_names)
        metrics["zeroshot/num_images"] = float(sum(len(x) for x in labels))
        return metrics

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            metrics = {**self.validation(model), **self.zeroshot(model)}
        finally:
            model.train(was_training)
        metrics["eval/seconds"] = time.perf_counter() - start
        return metrics


def _spread_over_classes(items: Iterator, limit: int, num_classes: int) -> Iterator:
    """At most `limit` images, the same number from each class (ImageFolder lists class by class)."""
    per_class = max(1, limit // max(1, num_classes))
    taken: dict[int, int] = {}
    for item in items:
        if taken.get(item.class_index, 0) < per_class:
            taken[item.class_index] = taken.get(item.class_index, 0) + 1
            yield item
