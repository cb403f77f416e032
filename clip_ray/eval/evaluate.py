"""Everything measured on a model during and after training, in one pass per data set.

- validation contrastive loss over batches of exactly `eval.batch_size` pairs
  (a loss depends on its batch size, so runs only compare at a fixed one);
- retrieval recall@k both ways on the same pairs, captions grouped by photo;
- zero-shot top-1/top-5 on an ImageFolder with a prompt-template ensemble.

Sharded: every rank of a process group calls the Evaluator together and reads,
decodes and encodes only its share (its split of the Ray Data validation stream,
every world-th zero-shot image, a block of the classes); the features go to
rank 0, which scores them and returns the metrics (other ranks return {}).
Rank 0 puts the validation pairs in one canonical order, sorted by (image_id,
key), before batching them for the loss, so 1, 2 or 64 workers give the same
figures up to float summation.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from clip_ray.config import Config
from clip_ray.data.formats import FailureCounts
from clip_ray.data.stream.batches import eval_batches
from clip_ray.data.stream.pipeline import build_eval_dataset
from clip_ray.data.stream.preprocess import Preprocessor
from clip_ray.eval.gather import broadcast_from_rank0, gather_objects, gather_rows, shard
from clip_ray.eval.retrieval import group_by_image, retrieval_recall
from clip_ray.eval.templates import resolve_class_names, resolve_templates
from clip_ray.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier
from clip_ray.eval.zeroshot_images import ListedImage, image_batches, select_images
from clip_ray.loss import build_loss, rank_and_world
from clip_ray.model.precision import autocast_context


class Evaluator:
    """Holds what evaluation needs (tokenizer, class names, templates) and runs it on a model.

    With world_size > 1 it is a collective: every rank calls it with the same weights.
    """

    def __init__(self, config: Config, tokenizer, device: torch.device, rank: int = 0, world_size: int = 1):
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        if (rank, world_size) != rank_and_world():  # the gathers follow torch.distributed's group
            raise ValueError(f"Evaluator for rank {rank} of {world_size} in a process that is rank "
                             f"{rank_and_world()[0]} of {rank_and_world()[1]}")
        self.rank, self.world_size = rank, world_size
        self.context_length = config.model.text.context_length
        self.image_size = config.model.vision.image_size
        self.loss_fn = build_loss(config.train.loss, gather=False)
        self._val_dataset = None
        self._val_share = None
        self._zeroshot_items: list[ListedImage] | None = None
        # Rows this rank encoded in the last call, per data set: what shows the work is shared.
        self.encoded: dict[str, int] = {}
        self.class_names: list[str] = []
        self.templates: list[str] = []
        zeroshot_dir = config.data.zeroshot_dir
        if zeroshot_dir:
            names_file = config.eval.zeroshot_class_names
            # Resolved as a suite's are: a named set, a file (or the folder's own names), a list.
            self.class_names = resolve_class_names(names_file or zeroshot_dir)
            self.templates = resolve_templates(config.eval.zeroshot_templates)

    # ------------------------------------------------------------------ helpers

    def _autocast(self):
        return autocast_context(self.config.train.precision, self.device.type)

    def _encode_images(self, model, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return model.encode_image(images.to(self.device, non_blocking=True)).float()

    def _encode_texts(self, model, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return model.encode_text(tokens.to(self.device, non_blocking=True)).float()

    def _features(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """This rank's features as one [N, D] tensor ([0, D] when it had none: shapes must agree to gather)."""
        if parts:
            return torch.cat(parts)
        return torch.empty(0, self.config.model.embed_dim, device=self.device)

    def val_dataset(self):
        """The (limited) validation dataset; built where it is split, rank 0."""
        if self._val_dataset is None and self.config.data.val:
            dataset = build_eval_dataset(self.config.data, self.image_size, self.context_length)
            if self.config.eval.max_val_samples:
                dataset = dataset.limit(self.config.eval.max_val_samples)
            # A pass over the held-out pairs takes seconds: its progress block would only say "0 rows".
            dataset.context.enable_progress_bars = False
            # Blocks of at most one eval batch: small images would otherwise fill one block per data unit
            # (256 photos of a caption table), and a split hands out whole blocks.
            pixel_bytes = 1 if self.config.data.uint8_images else 4
            row_bytes = 3 * self.image_size ** 2 * pixel_bytes + 8 * self.context_length
            batch_bytes = self.config.eval.batch_size * row_bytes
            dataset.context.target_max_block_size = min(dataset.context.target_max_block_size or batch_bytes,
                                                        batch_bytes)
            self._val_dataset = dataset
        return self._val_dataset

    def val_share(self):
        """This rank's part of data.val, made once: the split's iterators are picklable handles on one
        coordinator, and each new pass over them (every rank at once) runs the dataset again."""
        if self._val_share is None and self.config.data.val:
            if self.world_size == 1:
                self._val_share = self.val_dataset()
            else:
                pieces = self.val_dataset().streaming_split(self.world_size) if self.rank == 0 else None
                self._val_share = broadcast_from_rank0(pieces)[self.rank]
        return self._val_share

    def zeroshot_items(self) -> list[ListedImage]:
        """The scored images, listed once by rank 0 (one listing, and every rank agrees on it)."""
        if self._zeroshot_items is None:
            items = None
            if self.rank == 0:
                items = select_images(self.config.data.zeroshot_dir, self.config.eval.max_zeroshot_images,
                                      len(self.class_names), FailureCounts())
            self._zeroshot_items = broadcast_from_rank0(items)
        return self._zeroshot_items

    # ------------------------------------------------------------------ the measurements

    @torch.no_grad()
    def validation(self, model: nn.Module) -> dict[str, float]:
        """Validation loss at the fixed batch size, and retrieval recall, over data.val."""
        share = self.val_share()
        if share is None:
            return {}
        image_parts, text_parts, rows = [], [], []
        for batch in eval_batches(share, self.config.eval.batch_size, device=None):
            image_parts.append(self._encode_images(model, batch["image"]))
            text_parts.append(self._encode_texts(model, batch["text"]))
            rows += [(str(image_id), str(key)) for image_id, key in zip(batch["image_id"], batch["key"])]
        self.encoded["val"] = len(rows)
        images, texts = gather_rows(self._features(image_parts)), gather_rows(self._features(text_parts))
        rows = [row for part in gather_objects(rows) for row in part]
        if self.rank != 0 or not rows:
            return {}
        order = sorted(range(len(rows)), key=rows.__getitem__)
        return self._validation_metrics(model, images[order], texts[order], [rows[i][0] for i in order])

    def _validation_metrics(self, model: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                            image_ids: list[str]) -> dict[str, float]:
        """Scores the pairs in their canonical order: the loss over consecutive full batches (a short last
        one is left out), retrieval with each photo's features taken from its first pair."""
        size = self.config.eval.batch_size
        scale = model.logit_scale.exp().float()
        bias = getattr(model, "logit_bias", None)
        losses = [float(self.loss_fn(images[i:i + size], texts[i:i + size], scale, bias))
                  for i in range(0, len(image_ids) - size + 1, size)]
        first_rows, text_owner = group_by_image(image_ids)
        metrics = retrieval_recall(images[first_rows], texts, torch.tensor(text_owner),
                                   ks=self.config.eval.recall_at)
        metrics = {f"val/{name}": value for name, value in metrics.items()}
        if losses:
            metrics["val/loss"] = sum(losses) / len(losses)
        metrics["val/num_images"] = len(first_rows)
        metrics["val/num_captions"] = len(text_owner)
        return metrics

    def _classifier(self, model: nn.Module) -> torch.Tensor:
        """The [D, C] zero-shot classifier; each rank encodes a block of the classes' prompts."""
        mine = [self.class_names[i] for i in shard(len(self.class_names), self.rank, self.world_size)]
        weights = self._features([])
        if mine:
            weights = zeroshot_classifier(
                lambda tokens: self._encode_texts(model, tokens),
                lambda texts: self.tokenizer(texts, context_length=self.context_length),
                mine, self.templates, self.device).T
        return gather_rows(weights.contiguous()).T

    @torch.no_grad()
    def zeroshot(self, model: nn.Module) -> dict[str, float]:
        """Top-1/top-5 accuracy over data.zeroshot_dir, and the chance level beside it."""
        if not self.class_names:
            return {}
        classifier = self._classifier(model)
        preprocess = Preprocessor(self.image_size, self.context_length, self.tokenizer, train=False,
                                  max_pixels=self.config.data.max_pixels)
        mine = self.zeroshot_items()[self.rank::self.world_size]
        features, labels = [], []
        for images, batch_labels in image_batches(self.config.data.zeroshot_dir, mine, preprocess,
                                                  self.config.eval.batch_size, FailureCounts()):
            features.append(self._encode_images(model, images))
            labels.append(batch_labels.to(self.device))
        self.encoded["zeroshot"] = sum(len(x) for x in labels)
        features = gather_rows(self._features(features))
        labels = gather_rows(torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=self.device))
        if self.rank != 0 or not len(labels):
            return {}
        accuracy = zeroshot_accuracy(features, classifier, labels)
        metrics = {f"zeroshot/{name}": value for name, value in accuracy.items()}
        metrics["zeroshot/chance_top1"] = 1.0 / len(self.class_names)
        metrics["zeroshot/num_images"] = float(len(labels))
        return metrics

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """The metrics on rank 0; {} on the other ranks."""
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            metrics = {**self.validation(model), **self.zeroshot(model)}
        finally:
            model.train(was_training)
        if self.rank == 0:
            metrics["eval/seconds"] = time.perf_counter() - start
        return metrics
