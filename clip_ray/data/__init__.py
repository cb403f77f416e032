"""Image-text data, by role:

    formats/  readers, writers and sample checks: WebDataset tars, Parquet, folders + captions
    stream/   the training stream on Ray Data: shard order, mixing, decode + augment + tokenize, failures
    offline/  Ray jobs over whole data sets: convert between formats, curate by query matching
    demo/     the generated demo data: drawn scenes of coloured shapes and their captions

What makes a sample bad and how bad samples are counted lives in
`clip_ray.data.formats.samples`; a file's location in `clip_ray.storage`.
"""
