"""Near copies of evaluation images among curation's candidates: the scorer of its NearDuplicateFilter.

Equal bytes (clip_ray.data.offline.overlap) miss a re-encoded or resized copy of an
evaluation image; its embedding does not. Two steps, both on the CLIP-score filter's
actor pool settings (ClipScoreConfig: actors, their CPUs and GPU share, batch, precision):

    evaluation sets -> read + decode tasks (overlap's plan: ImageFolder runs, source partitions)
                    -> image-tower actors -> unit vectors gathered on the driver: one float32
                       [N, D] matrix, put in the object store once (`embed_eval_images`)
    candidates      -> read_for_scoring (images only) -> actors holding the matrix: each image's
                       highest cosine to any evaluation image, in blocks (`NearDuplicateScorer`)

The driver holds the evaluation matrix, O(evaluation images x D) floats (1,000 test
photos at D = 512 are 2 MB; even 1M evaluation images would be 2 GB), and nothing of
the candidates: what leaves the actors is a float and two ints per pair. Every actor
holds the matrix too, and multiplies each batch by it a block of rows at a time.

The preprocessing is the CLIP score's and the embedding job's (`Preprocessor(train=False,
uint8_images=True)`), so a cosine here is one of what `clip-ray embed` would write. An
evaluation image that does not decode has no embedding and is counted by reason; a
candidate that does not decode gets its reason as its fate, as the CLIP score's do.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import ray
import torch

from clip_ray.config import SourceConfig
from clip_ray.config.clip_score import ClipScoreConfig
from clip_ray.data.formats import BadSample, FailureCounts, Sample
from clip_ray.data.offline.overlap import EvalImages, distinct_eval_images, plan_eval_tasks
from clip_ray.data.offline.partitions import Partition
from clip_ray.data.stream.preprocess import Preprocessor
from clip_ray.inference.clip_score import ClipPairScorer, on_actor_pool, scoring_preprocessor
from clip_ray.inference.encoder import ClipEncoder
from clip_ray.inference.models import ResolvedModel

# Evaluation rows multiplied at once: a [batch, EVAL_ROWS_PER_PRODUCT] float32 product per step.
EVAL_ROWS_PER_PRODUCT = 16_384


class _ImageTower(ClipEncoder):
    """The image tower alone, float32 unit vectors; rows whose "drop" is set are not encoded."""

    def __init__(self, model: ResolvedModel, precision: str = "auto"):
        super().__init__(model, towers=("image",), dtype="float32", precision=precision)

    def encode_decoded(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(the unit vectors of the rows that decoded, [good, D]; which rows those are, [N] bool)."""
        good = batch["drop"] == ""
        if not good.any():
            return np.zeros((0, self.embed_dim), dtype=np.float32), good
        return self.encode_images(batch["image"][good]), good


class _EvalImageEmbedder(_ImageTower):
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors, good = self.encode_decoded(batch)
        embeddings = np.zeros((len(good), self.embed_dim), dtype=np.float32)
        embeddings[good] = vectors
        return {"embedding": embeddings, "drop": batch["drop"]}


class _NearestEvalImage(_ImageTower):
    """Scores a candidate by its image's highest cosine to any evaluation image (SCORE_SCHEMA rows)."""

    def __init__(self, model: ResolvedModel, eval_embeddings: ray.ObjectRef, precision: str = "auto"):
        super().__init__(model, precision)
        self.eval_embeddings = torch.tensor(ray.get(eval_embeddings), device=self.device)  # a copy: writable

    def nearest(self, vectors: np.ndarray) -> np.ndarray:
        """[n, D] unit vectors -> [n] highest cosine to an evaluation image (-inf when there is none)."""
        queries = torch.from_numpy(vectors).to(self.device)
        best = torch.full((len(vectors),), float("-inf"), device=self.device)
        for start in range(0, len(self.eval_embeddings), EVAL_ROWS_PER_PRODUCT):
            block = self.eval_embeddings[start:start + EVAL_ROWS_PER_PRODUCT]
            best = torch.maximum(best, (queries @ block.T).amax(dim=1))
        return best.cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors, good = self.encode_decoded(batch)
        scores = np.full(len(good), np.nan, dtype=np.float32)
        if good.any():
            scores[good] = self.nearest(vectors)
        return {"partition": batch["partition"], "position": batch["position"], "score": scores,
                "drop": batch["drop"]}


def _decoded_block(pixels: list[np.ndarray], drops: list[str]) -> dict[str, np.ndarray]:
    return {"image": np.stack(pixels).transpose(0, 3, 1, 2), "drop": np.array(drops, dtype=object)}


def _decode_eval_images(batch: dict[str, np.ndarray], *, preprocessor: Preprocessor,
                        batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Planned tasks in; their distinct images decoded (or blank with the reason they were not) out in blocks."""
    blank = np.zeros((preprocessor.image_size, preprocessor.image_size, 3), dtype=np.uint8)
    pixels, drops = [], []
    for task in batch["task"].tolist():
        counts = FailureCounts()
        for _, image in distinct_eval_images(task, counts):
            try:
                pixels.append(preprocessor.image(Sample(key="", image=image, caption="")))
                drops.append("")
            except BadSample as bad:
                pixels.append(blank)
                drops.append(bad.reason.value)
            if len(drops) == batch_size:
                yield _decoded_block(pixels, drops)
                pixels, drops = [], []
        for reason, n in counts.failed.items():  # not read at all: a missing or empty file
            pixels += [blank] * n
            drops += [reason] * n
    if drops:
        yield _decoded_block(pixels, drops)


def embed_eval_images(sets: list[EvalImages], model: ResolvedModel, config: ClipScoreConfig,
                      max_pixels: int) -> tuple[np.ndarray, dict[str, int]]:
    """(the unit image embeddings of every distinct evaluation image, float32 [N, D], on the driver;
    {reason: images} of those that could not be read or decoded)."""
    planning = FailureCounts()
    tasks = plan_eval_tasks(sets, planning)
    failures = dict(planning.failed)
    embed_dim = model.model_config.embed_dim
    if not tasks:
        return np.zeros((0, embed_dim), dtype=np.float32), failures
    decoded = ray.data.from_items([{"task": task} for task in tasks], override_num_blocks=len(tasks)).map_batches(
        _decode_eval_images, batch_size=1, batch_format="numpy", num_cpus=config.decode_cpus,
        fn_kwargs={"preprocessor": scoring_preprocessor(model, max_pixels), "batch_size": config.batch_size})
    embedded = on_actor_pool(decoded, _EvalImageEmbedder, {"model": model, "precision": config.precision}, config)
    vectors = [np.zeros((0, embed_dim), dtype=np.float32)]
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        good = batch["drop"] == ""
        vectors.append(batch["embedding"][good].astype(np.float32, copy=False))
        for reason in batch["drop"][~good].tolist():
            failures[reason] = failures.get(reason, 0) + 1
    return np.concatenate(vectors), dict(sorted(failures.items()))


class NearDuplicateScorer(ClipPairScorer):
    """A `PairScorer`: each candidate's score is its image's highest cosine to any of `eval_embeddings`
    (unit vectors, [N, D], put in the object store here once and shared by every actor)."""

    def __init__(self, model: ResolvedModel, config: ClipScoreConfig, max_pixels: int, eval_embeddings: np.ndarray):
        super().__init__(model, config, max_pixels)
        self.num_eval_images = len(eval_embeddings)
        self.eval_embeddings = ray.put(np.ascontiguousarray(eval_embeddings, dtype=np.float32))

    def __call__(self, candidates: ray.data.Dataset, partitions: list[Partition],
                 source: SourceConfig) -> ray.data.Dataset:
        images = self.decoded(candidates, partitions, source, tokenize=False)
        return on_actor_pool(images, _NearestEvalImage, {"model": self.model, "precision": self.config.precision,
                                                         "eval_embeddings": self.eval_embeddings}, self.config)
