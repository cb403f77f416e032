"""The curation job (`clip-ray data curate`) with its optional CLIP-score filter, composed on the driver.

clip_ray.data.offline.curate knows queries, dedup and caps, and filters by a score
only through a scorer it is given; clip_ray.inference.clip_score is that scorer for a
CLIP model. This module resolves the model once (pinning the exact checkpoint, so a run
that goes on training cannot change it half-way) and hands the two together to the job.
"""

from __future__ import annotations

from clip_ray.config import SourceConfig
from clip_ray.config.clip_score import ClipScoreConfig
from clip_ray.data.offline.curate import CurateOptions, curate
from clip_ray.data.offline.score_filter import ScoreFilter
from clip_ray.inference.clip_score import ClipPairScorer
from clip_ray.inference.models import ResolvedModel, resolve_model


def resolve_clip_model(config: ClipScoreConfig) -> ResolvedModel:
    """The scoring model of `config`; raises ModelSourceError naming the source when it cannot be used."""
    return resolve_model(config.model, config.tokenizer, config.tracking_uri, config.state_dict_activation)


def clip_score_filter(config: ClipScoreConfig, model: ResolvedModel, max_pixels: int) -> ScoreFilter:
    """The score filter curation runs: the model's scorer, the config's rule, the model's identity for the report."""
    return ScoreFilter(scorer=ClipPairScorer(model, config, max_pixels), min_score=config.min_score,
                       top_fraction=config.top_fraction,
                       about={"model": model.identity(), "precision": config.precision})


def curate_job(source: SourceConfig, queries_file: str | None, out_dir: str, options: CurateOptions | None = None,
               clip_score: ClipScoreConfig | None = None, model: ResolvedModel | None = None) -> dict:
    """Runs curation (see clip_ray.data.offline.curate) on the connected Ray cluster, filtering by CLIP score when
    `clip_score` is given (`model`: its model resolved already, else resolved here). Returns the report."""
    options = options or CurateOptions()
    score_filter = None
    if clip_score is not None:
        clip_score.validate()
        model = model or resolve_clip_model(clip_score)
        score_filter = clip_score_filter(clip_score, model, options.max_pixels)
    return curate(source, queries_file, out_dir, options, score_filter)
