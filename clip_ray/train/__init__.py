"""Training: the per-worker loop (loop.py), its TorchTrainer assembly (trainer.py), the
optimiser recipe of the CLIP paper (optim.py) and exactly resumable checkpoints (checkpoint.py)."""
