"""The architecture of clip_ray, declared as layers of its import graph.

The import graph is the architecture: what a module may import decides what it
can depend on, what can be tested alone and what ships to a Ray worker. Each
layer below lists module/package prefixes, lowest first. A lower layer never
imports a higher one, and there are no import cycles between modules, at module
level or inside functions. Modules of the same layer may import each other.
Every module of clip_ray belongs to a layer, so a new package is placed on
purpose. tests/test_layering.py enforces all of this with `ast`.

This module imports nothing from clip_ray.
"""

from __future__ import annotations

LAYERS: tuple[tuple[str, ...], ...] = (
    # utilities: files and URIs, the Ray connection, scaling-law maths
    ("clip_ray.storage", "clip_ray.ray_session", "clip_ray.scaling", "clip_ray.layers"),
    # typed configs, presets, loading and checking
    ("clip_ray.config",),
    # the network, tokenizer, precision, contrastive losses
    ("clip_ray.model", "clip_ray.loss"),
    # formats, the training stream, offline data jobs, demo data
    ("clip_ray.data",),
    # metrics; MLflow
    ("clip_ray.eval", "clip_ray.tracking"),
    # what runs inside each Ray Train worker
    ("clip_ray.worker",),
    # using a trained model: resolving its source, encoder actors, embedding files, search
    ("clip_ray.inference",),
    # what runs once per job on the driver (prepare, trainer, demo, sweeps)
    ("clip_ray.driver",),
    # the command line
    ("clip_ray.cli",),
)

# Sub-layers inside clip_ray.data, lowest first. formats is the base the other
# three build on; stream, offline and demo are siblings that never import each
# other (the sibling rule holds only here, not in LAYERS).
DATA_LAYERS: tuple[tuple[str, ...], ...] = (
    # file formats and the sample record: folders, tables, WebDataset shards
    ("clip_ray.data.formats",),
    # the training stream; offline data jobs; demo data
    ("clip_ray.data.stream", "clip_ray.data.offline", "clip_ray.data.demo"),
)
