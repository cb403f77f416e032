"""The curation job (`clip-ray data curate`) with its optional CLIP-score filter, composed on the driver.

clip_ray.data.offline.curate knows queries, dedup and caps, and filters by a score
only through a scorer it is given; clip_ray.inference.clip_score is that scorer for a
CLIP model, and clip_ray.inference.near_duplicates the scorer of its near-duplicate
filter (evaluation images embedded first, here on the driver's cluster). This module
resolves the model once (pinning the exact checkpoint, so a run that goes on training
cannot change it half-way) and hands them together to the job. Both filters share the
model and the actor settings of one ClipScoreConfig; its thresholds are the score
filter's, so near-duplicates alone leave them None.
"""

from __future__ import annotations

from clip_ray.config import SourceConfig
from clip_ray.config.clip_score import ClipScoreConfig
from clip_ray.data.offline.curate import CurateOptions, curate
from clip_ray.data.offline.overlap import NearDuplicateFilter
from clip_ray.data.offline.score_filter import ScoreFilter
from clip_ray.inference.clip_score import ClipPairScorer
from clip_ray.inference.models import ResolvedModel, resolve_model
from clip_ray.inference.near_duplicates import NearDuplicateScorer, embed_eval_images
from clip_ray.ray_session import connect_ray


def resolve_clip_model(config: ClipScoreConfig) -> ResolvedModel:
    """The scoring model of `config`; raises ModelSourceError naming the source when it cannot be used."""
    return resolve_model(config.model, config.tokenizer, config.tracking_uri, config.state_dict_activation)


def clip_score_filter(config: ClipScoreConfig, model: ResolvedModel, max_pixels: int) -> ScoreFilter:
    """The score filter curation runs: the model's scorer, the config's rule, the model's identity for the report."""
    return ScoreFilter(scorer=ClipPairScorer(model, config, max_pixels), min_score=config.min_score,
                       top_fraction=config.top_fraction,
                       about={"model": model.identity(), "precision": config.precision})


def scores_pairs(config: ClipScoreConfig | None) -> bool:
    """Whether `config` asks for the CLIP-score filter (a threshold, a top fraction or both)."""
    return config is not None and (config.min_score is not None or config.top_fraction is not None)


def near_duplicate_filter(config: ClipScoreConfig, model: ResolvedModel, threshold: float,
                          options: CurateOptions) -> NearDuplicateFilter:
    """The near-duplicate filter curation runs: the evaluation images of `options.exclude_images` embedded on the
    connected cluster (the driver holds them: O(evaluation images)), and the scorer comparing candidates to them."""
    near = NearDuplicateFilter(scorer=None, threshold=threshold)
    near.validate()
    if not options.exclude_images:
        raise ValueError("a near-duplicate filter compares with the exclude_images sets: give at least one")
    embeddings, failures = embed_eval_images(options.exclude_images, model, config, options.max_pixels)
    near.scorer = NearDuplicateScorer(model, config, options.max_pixels, embeddings)
    near.about = {"model": model.identity(), "precision": config.precision, "eval_images": len(embeddings),
                  "eval_image_failures": failures}
    return near


def curate_job(source: SourceConfig, queries_file: str | None, out_dir: str, options: CurateOptions | None = None,
               clip_score: ClipScoreConfig | None = None, model: ResolvedModel | None = None,
               near_duplicate_threshold: float | None = None) -> dict:
    """Runs curation (see clip_ray.data.offline.curate) on the connected Ray cluster, filtering by CLIP score when
    `clip_score` has a threshold or top fraction, and dropping near copies of the evaluation images (cosine of the
    image embeddings >= `near_duplicate_threshold`) with `clip_score`'s model and actor settings. `model`: that
    model resolved already, else resolved here. Returns the report."""
    options = options or CurateOptions()
    score_filter = near_duplicates = None
    if clip_score is not None:
        # near-duplicates alone use only the model and the actors: no score rule is required then
        clip_score.validate(require_rule=near_duplicate_threshold is None or scores_pairs(clip_score))
        model = model or resolve_clip_model(clip_score)
    elif near_duplicate_threshold is not None:
        raise ValueError("a near-duplicate filter needs clip_score: its model and actor settings embed the images")
    if scores_pairs(clip_score):
        score_filter = clip_score_filter(clip_score, model, options.max_pixels)
    if near_duplicate_threshold is not None:
        connect_ray()
        near_duplicates = near_duplicate_filter(clip_score, model, near_duplicate_threshold, options)
    return curate(source, queries_file, out_dir, options, score_filter, near_duplicates)
