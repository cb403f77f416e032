"""MLflow: everything a run leaves in the tracking store.

    tracker.py         Tracker: rank 0's run (params, metrics, figures, model), that never stops training
    run.py             finding the tracking URI, creating or resuming a run, its parameters
    export.py          the trained model as an MLflow model (torch.export program + tokenizer)
    pyfunc.py          the logged model's python_function flavor: images and texts in, embeddings out
    figures.py         the plots logged at the end of a run
    system_metrics.py  CPU, memory and GPU probes logged beside the training metrics
"""
