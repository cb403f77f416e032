"""Image-text data: formats (readers, writers), bad-input accounting, pipelines.

Readers and writers live in `clip_ray.data.formats`; what makes a sample bad and
how bad samples are counted lives in `clip_ray.data.samples`.
"""
