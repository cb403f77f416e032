"""What runs inside every Ray Train worker, once per process, for the whole job.

    loop.py        run_training(config, context): the per-worker function, a plain function of a Config
    position.py    DataPosition: where the loop stands in the data (saved in checkpoints)
    step.py        TrainStep: one optimiser step (DDP, global-batch loss, accumulation, non-finite guard)
    optim.py       the paper's AdamW recipe, warm-up + cosine schedule, gradient clipping and scaling
    checkpoint.py  exactly resumable checkpoints: model, optimiser, RNGs, data position
    context.py     WorkerContext: rank, device, report and checkpoint hand-off (Ray Train's, or a test's)

Nothing here imports clip_ray.driver: a worker gets a prepared Config and never
prepares, checks or loads one itself.
"""
