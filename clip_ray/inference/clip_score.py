"""CLIP scores of image-text pairs, streamed: the scorer of curation's score filter (data/offline/score_filter.py).

    candidates (partition, position), a block per partition as curation's scan wrote them
      -> map_batches(read_for_scoring)   CPU tasks, any node: read each partition of the block once,
                                         decode + centre-crop + tokenize only the wanted pairs
      -> map_batches(ClipScorer)         an actor pool, each actor loading the model once:
                                         both towers, cosine of the two unit vectors
      -> (partition, position, score, drop) rows

A block holding several partitions, or part of one, is still read right (each of its
partitions once, for the positions it holds); the scan's blocks are one partition each,
so each partition is read once. Where the decode tasks and the actors ask for the same
resources, Ray Data may fuse the two stages into the actors; with a GPU share they stay apart.

The pixels exist only in Ray Data's streaming blocks between the two stages; what
leaves the actors is a float and two ints per pair, and nothing comes to the driver.
A pair whose image does not decode goes on with zero pixels and its reason in `drop`
(the actor does not encode it), so curation counts it by reason. The preprocessing is
the embedding job's (`Preprocessor(train=False)`, uint8 pixels normalised on the
actor's device), so a score is the cosine of what `clip-ray embed` would write, in float32.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import ray

from clip_ray.config import SourceConfig
from clip_ray.config.clip_score import ClipScoreConfig
from clip_ray.data.formats import BadSample, FailureCounts
from clip_ray.data.offline.partitions import Partition, read_partition
from clip_ray.data.stream.preprocess import Preprocessor
from clip_ray.inference.encoder import TOWERS, ClipEncoder
from clip_ray.inference.models import ResolvedModel


class ClipScorer(ClipEncoder):
    """Scores decoded pairs: the cosine of the image and the text embedding (unit vectors, float32)."""

    def __init__(self, model: ResolvedModel, precision: str = "auto", device: str | None = None):
        super().__init__(model, towers=TOWERS, dtype="float32", precision=precision, device=device)

    def score(self, images: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] uint8 pixels and [N, L] tokens -> [N] float32 cosines."""
        return np.einsum("nd,nd->n", self.encode_images(images), self.encode_texts(tokens)).astype(np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        drop = batch["drop"]
        good = drop == ""
        scores = np.full(len(drop), np.nan, dtype=np.float32)
        if good.any():
            scores[good] = self.score(batch["image"][good], batch["text"][good])
        return {"partition": batch["partition"], "position": batch["position"], "score": scores, "drop": drop}


def _block(index: int, positions: list[int], pixels: list[np.ndarray], captions: list[str], drops: list[str],
           preprocessor: Preprocessor, tokenize: bool) -> dict[str, np.ndarray]:
    block = {"partition": np.full(len(positions), index, dtype=np.int32), "position": np.array(positions, np.int32),
             "image": np.stack(pixels).transpose(0, 3, 1, 2), "drop": np.array(drops, dtype=object)}
    if tokenize:
        block["text"] = preprocessor.text(captions)
    return block


def read_for_scoring(places: dict[str, np.ndarray], *, partitions: dict[int, Partition], source: SourceConfig,
                     preprocessor: Preprocessor, batch_size: int,
                     tokenize: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """(partition, position) rows in; the pairs at those places, decoded, out in blocks of `batch_size`
    (their captions tokenized as "text" unless `tokenize` is False: an image-only scorer needs none)."""
    wanted: dict[int, set[int]] = {}
    for index, position in zip(places["partition"].tolist(), places["position"].tolist()):
        wanted.setdefault(index, set()).add(position)
    for index, positions in wanted.items():
        yield from _read_partition_for_scoring(index, positions, partitions[index], source, preprocessor, batch_size,
                                               tokenize)


def _read_partition_for_scoring(index: int, wanted: set[int], partition: Partition, source: SourceConfig,
                                preprocessor: Preprocessor, batch_size: int,
                                tokenize: bool) -> Iterator[dict[str, np.ndarray]]:
    """Positions count the samples the reader yields, as curation's scan counted them; the reader's own skips
    were counted by the scan. The read stops at the last wanted position."""
    blank = np.zeros((preprocessor.image_size, preprocessor.image_size, 3), dtype=np.uint8)
    positions, pixels, captions, drops = [], [], [], []
    for position, sample in enumerate(read_partition(partition, source, FailureCounts())):
        if position not in wanted:
            continue
        wanted.discard(position)
        try:
            pixels.append(preprocessor.image(sample))
            drops.append("")
        except BadSample as bad:
            pixels.append(blank)
            drops.append(bad.reason.value)
        positions.append(position)
        captions.append(sample.caption)
        if len(positions) == batch_size:
            yield _block(index, positions, pixels, captions, drops, preprocessor, tokenize)
            positions, pixels, captions, drops = [], [], [], []
        if not wanted:
            break
    if positions:
        yield _block(index, positions, pixels, captions, drops, preprocessor, tokenize)


def on_actor_pool(dataset: ray.data.Dataset, actor: type, constructor_kwargs: dict,
                  config: ClipScoreConfig) -> ray.data.Dataset:
    """`dataset` mapped by `actor` (a ClipEncoder that loads the model once) on the config's pool of actors."""
    resources = {"num_cpus": config.cpus_per_actor}
    if config.gpus_per_actor:
        resources["num_gpus"] = config.gpus_per_actor
    return dataset.map_batches(actor, fn_constructor_kwargs=constructor_kwargs, batch_size=config.batch_size,
                               batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=config.actors),
                               **resources)


def scoring_preprocessor(model: ResolvedModel, max_pixels: int) -> Preprocessor:
    """The embedding job's preprocessing for `model`: centre crop, uint8 pixels (normalised on the actor)."""
    model_config = model.model_config
    return Preprocessor(model_config.vision.image_size, model_config.text.context_length, model.tokenizer,
                        train=False, uint8_images=True, max_pixels=max_pixels)


class ClipPairScorer:
    """A `PairScorer` (clip_ray.data.offline.score_filter) that scores pairs with one CLIP model on an actor pool."""

    def __init__(self, model: ResolvedModel, config: ClipScoreConfig, max_pixels: int):
        self.model, self.config = model, config
        self.preprocessor = scoring_preprocessor(model, max_pixels)

    def decoded(self, candidates: ray.data.Dataset, partitions: list[Partition], source: SourceConfig,
                tokenize: bool = True) -> ray.data.Dataset:
        """The candidates' pairs read and decoded by CPU tasks (read_for_scoring)."""
        return candidates.map_batches(
            read_for_scoring, batch_size=None, batch_format="numpy", num_cpus=self.config.decode_cpus,
            fn_kwargs={"partitions": {p.index: p for p in partitions}, "source": source,
                       "preprocessor": self.preprocessor, "batch_size": self.config.batch_size, "tokenize": tokenize})

    def __call__(self, candidates: ray.data.Dataset, partitions: list[Partition],
                 source: SourceConfig) -> ray.data.Dataset:
        return on_actor_pool(self.decoded(candidates, partitions, source), ClipScorer,
                             {"model": self.model, "precision": self.config.precision}, self.config)
