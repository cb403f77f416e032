"""Evaluation images out of the training data: pairs whose image bytes equal an evaluation image's.

The CLIP paper measured how much of each evaluation set its training data held;
curation removes that overlap before it can leak. Every image of the evaluation
sets (ImageFolder trees, or the images of any source clip-ray reads, a split file
respected) is hashed (sha256 of its bytes, as pass one hashes training images)
in parallel Ray Data tasks. Those hashes are joined to the candidate pairs by a
groupby on the hash, so neither side passes through the driver, and every
candidate in a group that holds an evaluation image gets the fate eval_overlap.

Equal bytes find only exact copies. A re-encoded or resized copy is found by
a `NearDuplicateFilter`: its scorer gives each remaining candidate the highest
cosine between its image's embedding and any evaluation image's (the caller
brings the model: clip_ray.inference.near_duplicates), and a candidate at or
above the threshold is eval_overlap too. Its scores are joined to the
candidates as the score filter joins its own, and then cleared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from clip_ray.config import SourceConfig
from clip_ray.data.formats import FailureCounts, FailureReason, list_image_folder
from clip_ray.data.formats.folders import read_listed_images
from clip_ray.data.offline.pair_rows import (
    EVAL_OVERLAP, KEPT, SIDE, count_fates, joined_by, set_column, set_drop, still_in,
)
from clip_ray.data.offline.partitions import Partition, plan_partitions, read_partition
from clip_ray.data.offline.score_filter import PairScorer, attach_scores
from clip_ray.storage import resolve

IMAGES_PER_TASK = 1000
_HASH_SCHEMA = pa.schema([("image_hash", pa.binary()), ("drop", pa.string())])  # drop: "" or why not hashed


@dataclass
class EvalImages:
    """One evaluation set: an ImageFolder tree (`image_folder`) or an image-text `source`."""

    image_folder: str | None = None
    source: SourceConfig | None = None

    def validate(self) -> None:
        if (self.image_folder is None) == (self.source is None):
            raise ValueError("an evaluation set is an image_folder or a source, exactly one of them")
        if self.source is not None:
            self.source.validate("exclude_images.source")

    def describe(self) -> str:
        if self.image_folder is not None:
            return f"imagefolder:{self.image_folder}"
        return f"{self.source.format}:{self.source.path}"


def plan_eval_tasks(sets: list[EvalImages], counts: FailureCounts) -> list[str]:
    """The inputs of the tasks that read the evaluation images (hashing here, embedding in
    clip_ray.inference.near_duplicates), as JSON: a partition of a source, or a run of an ImageFolder's images."""
    tasks = []
    for images in sets:
        if images.source is not None:
            source = dataclasses.asdict(images.source)
            tasks += [json.dumps({"source": source, "partition": dataclasses.asdict(p)})
                      for p in plan_partitions(images.source, IMAGES_PER_TASK, counts)]
            continue
        try:
            classes, listed = list_image_folder(images.image_folder)
        except OSError as err:
            counts.reject(FailureReason.UNREADABLE_SHARD, images.image_folder, "", f"{type(err).__name__}: {err}")
            continue
        tasks += [json.dumps({"folder": images.image_folder, "classes": classes,
                              "images": listed[start:start + IMAGES_PER_TASK]})
                  for start in range(0, len(listed), IMAGES_PER_TASK)]
    return tasks


def _images_of(task: dict, counts: FailureCounts) -> Iterator[bytes]:
    if "folder" in task:
        fs, _ = resolve(task["folder"])
        listed = [tuple(item) for item in task["images"]]
        return (image.image for image in read_listed_images(listed, task["classes"], fs, counts))
    partition = Partition(**task["partition"])
    return (sample.image for sample in read_partition(partition, SourceConfig(**task["source"]), counts))


def distinct_eval_images(task: str, counts: FailureCounts) -> Iterator[tuple[bytes, bytes]]:
    """(sha256, image bytes) of each distinct image of one planned task (JSON, from plan_eval_tasks): a caption
    table yields its image once per caption. What could not be read is counted in `counts`."""
    seen = set()
    for image in _images_of(json.loads(task), counts):
        digest = hashlib.sha256(image).digest()
        if digest not in seen:
            seen.add(digest)
            yield digest, image


def _hash_batch(batch: pa.Table) -> pa.Table:
    hashes, drops = [], []
    for task in batch["task"].to_pylist():
        counts = FailureCounts()
        for digest, _ in distinct_eval_images(task, counts):
            hashes.append(digest)
            drops.append("")
        for reason, n in sorted(counts.failed.items()):
            hashes += [b""] * n
            drops += [reason] * n
    return pa.table({"image_hash": hashes, "drop": drops}, schema=_HASH_SCHEMA)


def hash_eval_images(sets: list[EvalImages], cpus_per_task: float = 1.0) -> tuple[ray.data.Dataset, dict]:
    """(one row per evaluation image hashed: image_hash; the report's part: the sets, the distinct images hashed
    and the failures)."""
    planning = FailureCounts()
    tasks = plan_eval_tasks(sets, planning)
    report = {"sets": [images.describe() for images in sets], "images": 0, "failures": dict(planning.failed)}
    if not tasks:
        return ray.data.from_arrow(_HASH_SCHEMA.empty_table()), report
    rows = (ray.data.from_items([{"task": task} for task in tasks], override_num_blocks=len(tasks))
            .map_batches(_hash_batch, batch_size=1, batch_format="pyarrow", num_cpus=cpus_per_task)
            .materialize())
    for fate, n in count_fates(rows).items():
        if fate:
            report["failures"][fate] = report["failures"].get(fate, 0) + n
        else:
            report["images"] = n
    report["failures"] = dict(sorted(report["failures"].items()))
    return still_in(rows).select_columns(["image_hash"]), report


def _mark_overlap(block: pa.Table) -> pa.Table:
    """Whole groups of rows with one image hash: a pair whose hash is an evaluation image's is eval_overlap."""
    is_eval = pc.equal(block[SIDE], 1)
    pairs = block.filter(pc.invert(is_eval)).drop_columns([SIDE])
    leaked = pc.is_in(pairs["image_hash"], value_set=block.filter(is_eval)["image_hash"].combine_chunks())
    fates = np.where(leaked.to_numpy(zero_copy_only=False), EVAL_OVERLAP, pairs["drop"].to_numpy(zero_copy_only=False))
    return set_drop(pairs, fates.tolist())


def mark_overlap(candidates: ray.data.Dataset, eval_hashes: ray.data.Dataset,
                 num_partitions: int) -> ray.data.Dataset:
    """The candidate rows, those whose image is an evaluation image with the fate eval_overlap."""
    return joined_by(candidates, eval_hashes, "image_hash", _mark_overlap, num_partitions)


@dataclass
class NearDuplicateFilter:
    """Near copies of evaluation images: `scorer` gives each candidate its image's highest cosine to any
    evaluation image (SCORE_SCHEMA rows, as a score filter's scorer); `about` goes into the report."""

    scorer: PairScorer
    threshold: float
    about: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"the near-duplicate threshold is a cosine: must be in [-1, 1], got {self.threshold}")


def _judge_near(batch: pa.Table, threshold: float) -> pa.Table:
    """A scored pair at or above the threshold is eval_overlap; the similarity is cleared (score is the CLIP
    score's column)."""
    drop = batch["drop"].to_numpy(zero_copy_only=False)
    score = batch["score"].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls (unscored) are NaN
    fates = np.where((drop == KEPT) & (score >= threshold), EVAL_OVERLAP, drop)
    batch = set_drop(batch, fates.tolist())
    return set_column(batch, "score", [None] * batch.num_rows, pa.float32())


def mark_near_duplicates(candidates: ray.data.Dataset, near: NearDuplicateFilter, partitions: list[Partition],
                         source: SourceConfig, num_partitions: int) -> ray.data.Dataset:
    """The candidate rows, the near copies of evaluation images marked eval_overlap (a pair whose image first
    fails to decode here gets that reason)."""
    places = candidates.select_columns(["partition", "position"])
    joined = attach_scores(candidates, near.scorer(places, partitions, source), num_partitions)
    return joined.map_batches(_judge_near, fn_kwargs={"threshold": near.threshold}, batch_format="pyarrow")
