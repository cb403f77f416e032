"""Using a trained model: where it comes from, the encoder actors, embedding files and search.

    models.py           a model source (checkpoint, run directory, state dict file, MLflow model or
                        run) pinned on the driver as a picklable ResolvedModel; loaded where it encodes
    encoder.py          ClipEncoder: the Ray Data callable class that loads the model once per actor
                        and embeds preprocessed images and/or token rows
    partitions.py       the embedding job's partitions and its read + decode task (PartitionLedger
                        collects what each task skipped)
    embedding_files.py  the Parquet layout of embeddings: columns, fixed-size vectors, metadata
    search.py           exact top-k by chunked matrix products (FAISS HNSW when installed), query encoding

Above the worker layer (it reads the checkpoints the workers write) and below the driver,
whose `embed` job (clip_ray.driver.embed) and evaluation use it.
"""
