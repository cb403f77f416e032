"""What runs once per job, on the driver (the process `ray job submit` or `jobs/*.py` starts).

    prepare.py         prepare_job: the one place a Config is made ready for the workers
    trainer.py         the TorchTrainer of a prepared config, its run directory, train() -> TrainOutcome
    demo.py            the embedded default job: demo data generated, the before/after report
    evaluate_model.py  evaluating a checkpoint or an MLflow model after training
    embed.py           the embedding job: Ray Data read tasks -> encoder actors -> a Parquet file per partition
    sweep/             scaling sweeps: Ray Tune trials, each a training job, then the fits

The driver hands clip_ray.worker.loop.run_training to Ray Train; workers import
nothing from here.
"""
